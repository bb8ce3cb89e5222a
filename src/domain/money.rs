//! Money: integer minor units with a [`Currency`] code, never a float. A code is checked
//! against ISO 4217 at the edge (orders rejects an order in a code that is not, as
//! `invalid_currency`), so every amount past the edge has a known minor unit.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A currency code as it comes on the wire: exactly three ASCII uppercase letters. Whether it
/// is an ISO 4217 currency, and its minor unit, is [`Currency::minor_unit_exponent`]: orders
/// rejects an order in a code that is not (`invalid_currency`), so every amount past the edge
/// is in one.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Currency([u8; 3]);

/// A string that is not three uppercase ASCII letters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an ISO 4217 currency code (three uppercase letters, e.g. \"EUR\")")]
pub struct InvalidCurrency(pub String);

impl Currency {
    /// Validates `code`.
    pub fn new(code: &str) -> Result<Self, InvalidCurrency> {
        match code.as_bytes() {
            &[a, b, c] if [a, b, c].iter().all(u8::is_ascii_uppercase) => Ok(Currency([a, b, c])),
            _ => Err(InvalidCurrency(code.to_string())),
        }
    }

    /// The number of digits of the currency's minor unit (ISO 4217 list one): 2 for EUR, 0
    /// for JPY, 3 for KWD and BHD, 4 for CLF. `None` for a code that is not an ISO 4217
    /// currency, or one without a minor unit (precious metals, testing and fund codes such
    /// as XAU, XTS, XXX): the fleet takes no money in those.
    pub fn minor_unit_exponent(&self) -> Option<u32> {
        match self.as_str() {
            "BIF" | "CLP" | "DJF" | "GNF" | "ISK" | "JPY" | "KMF" | "KRW" | "PYG" | "RWF"
            | "UGX" | "UYI" | "VND" | "VUV" | "XAF" | "XOF" | "XPF" => Some(0),
            "BHD" | "IQD" | "JOD" | "KWD" | "LYD" | "OMR" | "TND" => Some(3),
            "CLF" | "UYW" => Some(4),
            code if ISO_4217_TWO_DIGITS.binary_search(&code).is_ok() => Some(2),
            _ => None,
        }
    }

    /// Whether this is an ISO 4217 currency the fleet takes money in.
    pub fn is_iso_4217(&self) -> bool {
        self.minor_unit_exponent().is_some()
    }

    /// The code, e.g. `"EUR"`.
    pub fn as_str(&self) -> &str {
        // Cannot fail: a Currency is only built by `new`, from three ASCII uppercase letters.
        std::str::from_utf8(&self.0).expect("a currency code is ASCII")
    }
}

/// The ISO 4217 (list one) currencies with a two-digit minor unit, sorted. Codes still listed
/// during a transition (ANG beside XCG, SLL beside SLE, ZWL beside ZWG, CUC) are kept.
const ISO_4217_TWO_DIGITS: &[&str] = &[
    "AED", "AFN", "ALL", "AMD", "ANG", "AOA", "ARS", "AUD", "AWG", "AZN", "BAM", "BBD", "BDT",
    "BGN", "BMD", "BND", "BOB", "BOV", "BRL", "BSD", "BTN", "BWP", "BYN", "BZD", "CAD", "CDF",
    "CHE", "CHF", "CHW", "CNY", "COP", "COU", "CRC", "CUC", "CUP", "CVE", "CZK", "DKK", "DOP",
    "DZD", "EGP", "ERN", "ETB", "EUR", "FJD", "FKP", "GBP", "GEL", "GHS", "GIP", "GMD", "GTQ",
    "GYD", "HKD", "HNL", "HTG", "HUF", "IDR", "ILS", "INR", "IRR", "JMD", "KES", "KGS", "KHR",
    "KPW", "KYD", "KZT", "LAK", "LBP", "LKR", "LRD", "LSL", "MAD", "MDL", "MGA", "MKD", "MMK",
    "MNT", "MOP", "MRU", "MUR", "MVR", "MWK", "MXN", "MXV", "MYR", "MZN", "NAD", "NGN", "NIO",
    "NOK", "NPR", "NZD", "PAB", "PEN", "PGK", "PHP", "PKR", "PLN", "QAR", "RON", "RSD", "RUB",
    "SAR", "SBD", "SCR", "SDG", "SEK", "SGD", "SHP", "SLE", "SLL", "SOS", "SRD", "SSP", "STN",
    "SVC", "SYP", "SZL", "THB", "TJS", "TMT", "TOP", "TRY", "TTD", "TWD", "TZS", "UAH", "USD",
    "USN", "UYU", "UZS", "VED", "VES", "WST", "XCD", "XCG", "YER", "ZAR", "ZMW", "ZWG", "ZWL",
];

impl TryFrom<String> for Currency {
    type Error = InvalidCurrency;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Currency::new(&s)
    }
}

impl From<Currency> for String {
    fn from(c: Currency) -> String {
        c.as_str().to_string()
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Currency({})", self.as_str())
    }
}

/// An amount in minor units (cents for EUR) of a currency.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Money {
    pub amount_minor: i64,
    pub currency: Currency,
}

impl Money {
    pub fn new(amount_minor: i64, currency: Currency) -> Self {
        Money {
            amount_minor,
            currency,
        }
    }

    /// Reads a decimal amount in major units (`"19.99"`, `"-3"`, `"1000.5"`) as minor units of
    /// `currency`: exactly, without floating point. More decimals than the currency has minor
    /// digits are refused unless they are zeros (`"19.990"` is 1999 cents; `"19.995"` is no
    /// amount of EUR).
    pub fn parse_decimal(text: &str, currency: Currency) -> Result<Money, String> {
        let digits = currency
            .minor_unit_exponent()
            .ok_or_else(|| format!("{currency} is not an ISO 4217 currency with minor units"))?;
        let bad = || format!("{text:?} is not an amount of {currency}");
        let (negative, unsigned) = match text.trim().strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, text.trim()),
        };
        let (whole, fraction) = unsigned.split_once('.').unwrap_or((unsigned, ""));
        if whole.is_empty() || !whole.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        if !fraction.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let digits = digits as usize;
        let (kept, rest) = fraction.split_at(fraction.len().min(digits));
        if rest.bytes().any(|b| b != b'0') {
            return Err(format!(
                "{text:?} has more decimals than {currency}'s {digits} minor digits"
            ));
        }
        let scale = 10i64.pow(digits as u32);
        let padded = format!("{kept:0<digits$}");
        let minor = whole
            .parse::<i64>()
            .ok()
            .and_then(|w| w.checked_mul(scale))
            .and_then(|w| w.checked_add(if digits == 0 { 0 } else { padded.parse().ok()? }))
            .ok_or_else(bad)?;
        Ok(Money::new(if negative { -minor } else { minor }, currency))
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} (minor units)", self.amount_minor, self.currency)
    }
}

#[cfg(test)]
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn currencies_are_three_uppercase_letters() {
        assert_eq!(Currency::new("EUR").unwrap().as_str(), "EUR");
        for bad in ["eur", "EU", "EURO", "E1R", "", "ÉUR"] {
            assert!(Currency::new(bad).is_err(), "{bad}");
        }
        let m: Money = serde_json::from_str(r#"{"amount_minor":5,"currency":"USD"}"#).unwrap();
        assert_eq!(m, Money::new(5, Currency::new("USD").unwrap()));
        assert!(serde_json::from_str::<Money>(r#"{"amount_minor":5,"currency":"usd"}"#).is_err());
        assert!(serde_json::from_str::<Money>(r#"{"amount_minor":5.5,"currency":"USD"}"#).is_err());
    }

    #[test]
    fn decimal_amounts_are_read_exactly() {
        let eur = Currency::new("EUR").unwrap();
        let jpy = Currency::new("JPY").unwrap();
        let ok = |t: &str, c| Money::parse_decimal(t, c).map(|m| m.amount_minor);
        assert_eq!(ok("19.99", eur), Ok(1999));
        assert_eq!(ok("19.9", eur), Ok(1990));
        assert_eq!(ok("19", eur), Ok(1900));
        assert_eq!(ok("19.990", eur), Ok(1999));
        assert_eq!(ok("-0.50", eur), Ok(-50));
        assert_eq!(ok("1200", jpy), Ok(1200));
        assert_eq!(ok("1200.00", jpy), Ok(1200));
        for bad in [
            "19.995",
            "",
            ".5",
            "1e3",
            "12,50",
            "NaN",
            "99999999999999999999",
        ] {
            assert!(Money::parse_decimal(bad, eur).is_err(), "{bad}");
        }
    }

    #[test]
    fn iso_4217_currencies_have_their_minor_unit() {
        let exp = |c: &str| Currency::new(c).unwrap().minor_unit_exponent();
        assert_eq!(exp("EUR"), Some(2));
        assert_eq!(exp("JPY"), Some(0));
        assert_eq!(exp("KWD"), Some(3));
        assert_eq!(exp("BHD"), Some(3));
        assert_eq!(exp("CLF"), Some(4));
        for not_money in ["XYZ", "ABC", "XAU", "XXX", "XTS", "HRK"] {
            assert_eq!(exp(not_money), None, "{not_money}");
        }
        assert!(
            ISO_4217_TWO_DIGITS.windows(2).all(|w| w[0] < w[1]),
            "sorted"
        );
    }
}
