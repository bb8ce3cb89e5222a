//! Masking of customer email addresses, so that no log line, database column or dead-letter
//! reason outside the message itself holds an address in full.
//!
//! [`mask`] keeps the first character of the local part and the whole domain
//! (`ada@example.com` → `a***@example.com`): enough to tell "all mail to one provider bounces"
//! from "one customer's box is full" at 3 a.m., too little to identify the customer. The
//! length of the local part is not revealed. [`redact`] applies the mask to free text such as
//! an SMTP reply (`550 5.1.1 <ada@example.com>: user unknown`), which often echoes the address,
//! and [`emails_in`] to text that may hold any address (a failure reason on a dead-lettered
//! message). [`crate::domain::redaction::for_display`] uses them to show an event on a terminal.

/// What stands for the hidden part of an address.
const STARS: &str = "***";

/// Masks an email address: the first character of the local part, `***`, then `@` and the
/// domain. Text without an `@` keeps only its first character; empty text becomes `***`.
/// Works on any input, including addresses that do not parse.
pub fn mask(address: &str) -> String {
    let address = address.trim();
    // rsplit: in a (quoted) local part that itself holds an `@`, the domain follows the last.
    let (local, domain) = match address.rsplit_once('@') {
        Some((local, domain)) => (local, Some(domain)),
        None => (address, None),
    };
    let mut out = String::new();
    // Control characters are never echoed: they could forge log lines.
    if let Some(first) = local.chars().next().filter(|c| !c.is_control()) {
        out.push(first);
    }
    out.push_str(STARS);
    if let Some(domain) = domain {
        out.push('@');
        out.extend(domain.chars().filter(|c| !c.is_control()));
    }
    out
}

/// Replaces every occurrence of `address` in `text` (ignoring ASCII case, as mail servers do
/// for domains and often for local parts) with its [`mask`].
pub fn redact(text: &str, address: &str) -> String {
    let needle = address.trim();
    if needle.is_empty() {
        return text.to_string();
    }
    let masked = mask(needle);
    let hay = text.to_ascii_lowercase();
    let needle_lower = needle.to_ascii_lowercase();
    let mut out = String::with_capacity(text.len());
    let mut last = 0;
    // ASCII lowercasing keeps byte offsets, so positions found in `hay` are valid in `text`.
    for (at, _) in hay.match_indices(&needle_lower) {
        if at < last {
            continue;
        }
        out.push_str(&text[last..at]);
        out.push_str(&masked);
        last = at + needle.len();
    }
    out.push_str(&text[last..]);
    out
}

/// Masks everything in `text` that looks like an email address (a run of address characters
/// with an `@` and something on both sides of it).
pub fn emails_in(text: &str) -> String {
    let is_part = |c: char| c.is_alphanumeric() || "._%+-@'".contains(c);
    let mut out = String::with_capacity(text.len());
    let mut run = String::new();
    let flush = |run: &mut String, out: &mut String| {
        let looks_like_address = run
            .split_once('@')
            .is_some_and(|(l, d)| !l.is_empty() && d.contains('.') && !d.ends_with('.'));
        if looks_like_address {
            out.push_str(&mask(run));
        } else {
            out.push_str(run);
        }
        run.clear();
    };
    for c in text.chars() {
        if is_part(c) {
            run.push(c);
        } else {
            flush(&mut run, &mut out);
            out.push(c);
        }
    }
    flush(&mut run, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_keeps_its_first_letter_and_its_domain() {
        assert_eq!(mask("ada@example.com"), "a***@example.com");
        assert_eq!(mask("j@example.com"), "j***@example.com");
        assert_eq!(mask("  grace.hopper+orders@navy.mil "), "g***@navy.mil");
    }

    #[test]
    fn the_length_of_the_local_part_is_not_revealed() {
        assert_eq!(mask("a@x.org").len(), mask("abcdefghij@x.org").len());
    }

    #[test]
    fn text_that_is_not_an_address_is_masked_too() {
        assert_eq!(mask("not-an-address"), "n***");
        assert_eq!(mask(""), "***");
        assert_eq!(mask("@example.com"), "***@example.com");
        assert_eq!(mask("\"a@b\"@example.com"), "\"***@example.com");
        assert_eq!(mask("é@exämple.com"), "é***@exämple.com");
        assert_eq!(mask("\nx@evil\r\n.com"), "x***@evil.com");
        assert_eq!(mask("\u{7}x@a.com"), "***@a.com");
    }

    #[test]
    fn redact_masks_every_occurrence_in_any_case() {
        let reply = "550 5.1.1 <Ada@Example.com>: Recipient address rejected: ada@example.com";
        let out = redact(reply, "ada@example.com");
        assert_eq!(
            out,
            "550 5.1.1 <a***@example.com>: Recipient address rejected: a***@example.com"
        );
        assert!(!out.to_ascii_lowercase().contains("ada@"));
        assert_eq!(redact("nothing here", "ada@example.com"), "nothing here");
        assert_eq!(redact("text", ""), "text");
    }

    #[test]
    fn every_address_in_free_text_is_masked_and_nothing_else() {
        let reason = "invalid value: string \"ada@example.com\", expected one of a, b; at 3@4";
        let out = emails_in(reason);
        assert_eq!(
            out,
            "invalid value: string \"a***@example.com\", expected one of a, b; at 3@4"
        );
        assert_eq!(
            emails_in("to <Bob.Smith+x@mail.co.uk>."),
            "to <B***@mail.co.uk>."
        );
        assert_eq!(emails_in("no address here"), "no address here");
    }
}
