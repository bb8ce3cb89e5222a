//! Developer tasks of the orderfleet workspace, kept out of the worker library.
//!
//! - [`cfn`]: the production CloudFormation template, generated from the fleet's topology.
//!
//! The binary runs them: `cargo run -p xtask -- cfn` (`make cfn`) writes the template to
//! [`TEMPLATE`], and `cargo run -p xtask -- cfn --check` fails when the committed copy differs.

use std::path::{Path, PathBuf};

pub mod cfn;

/// Where the generated template is committed, relative to the workspace root.
pub const TEMPLATE: &str = "deploy/cloudformation/orderfleet.json";

/// The workspace root: the directory above this crate's.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the xtask crate sits inside the workspace root")
        .to_path_buf()
}

/// The committed template's absolute path.
pub fn template_path() -> PathBuf {
    workspace_root().join(TEMPLATE)
}
