//! What this crate assumes about each Neural Engine generation, keyed by the sub-type
//! `+[_ANEDeviceInfo aneSubType]` reports: which MIL dialect to emit and the rated peak that
//! benchmark shares are computed against. Pure data and logic, tested everywhere.
//!
//! Sources (`ane-seed-facts.md`): M4 reports "H16G", base M5 "h16", M5 Max "h17" (§5.7,
//! PR#50); the original's compatibility matrix has program(1.3)/ios18 partial on M1 and
//! working on M3/M4/M5 (§1.9), and the older syntax was contributed for M1/M2 (§4.7). The
//! sub-types of M1 (h13…), M2 (h14…) and M3 (h15…) follow the same generation numbering but
//! were **not** seen in a report: an assumption until someone runs `ane probe` there.
//! Rated peaks: Apple's figures as the facts list them (M1 11 TOPS, M2 and M3 15.8, M4 38
//! INT8); an INT8 rating is twice the FP16 rate (M4: 19 FP16 TFLOP/s, the figure the
//! original meant to divide by, §1.4). One multiply-add counts as 2 operations in both.

use crate::mil::dialect::Dialect;

/// One row of the table.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Chip {
    /// The `aneSubType` prefix this row matches (lower case).
    pub sub_type: &'static str,
    /// The Apple silicon generation, for people.
    pub generation: &'static str,
    pub dialect: Dialect,
    /// Rated FP16 TFLOP/s, if known
    pub fp16_tflops: Option<f64>,
    /// Rated INT8 TOPS, if known
    pub int8_tops: Option<f64>,
    /// Whether the sub-type was seen in a report (false: inferred from the numbering)
    pub reported: bool,
}

pub const CHIPS: [Chip; 6] = [
    Chip {
        sub_type: "h13",
        generation: "M1",
        dialect: Dialect::Ios16,
        fp16_tflops: Some(11.0),
        int8_tops: None,
        reported: false,
    },
    Chip {
        sub_type: "h14",
        generation: "M2",
        dialect: Dialect::Ios16,
        fp16_tflops: Some(15.8),
        int8_tops: None,
        reported: false,
    },
    Chip {
        sub_type: "h15",
        generation: "M3",
        dialect: Dialect::Ios18,
        fp16_tflops: Some(15.8),
        int8_tops: None,
        reported: false,
    },
    Chip {
        sub_type: "h16g",
        generation: "M4",
        dialect: Dialect::Ios18,
        fp16_tflops: Some(19.0),
        int8_tops: Some(38.0),
        reported: true,
    },
    Chip {
        sub_type: "h16",
        generation: "M5",
        dialect: Dialect::Ios18,
        fp16_tflops: None,
        int8_tops: None,
        reported: true,
    },
    Chip {
        sub_type: "h17",
        generation: "M5 Max",
        dialect: Dialect::Ios18,
        fp16_tflops: None,
        int8_tops: None,
        reported: true,
    },
];

/// The row for a reported sub-type (case and surrounding text ignored: "aneSubType=H16G"
/// works), longest prefix first so "h16g" is M4 and "h16" M5; None for an unknown chip.
pub fn lookup(sub_type: &str) -> Option<&'static Chip> {
    let s = sub_type.trim().to_ascii_lowercase();
    let s = s.rsplit('=').next().unwrap_or(&s).trim().to_string();
    let mut rows: Vec<&Chip> = CHIPS.iter().filter(|c| s.starts_with(c.sub_type)).collect();
    rows.sort_by_key(|c| std::cmp::Reverse(c.sub_type.len()));
    rows.first().copied()
}

/// The dialect to emit for a chip: `requested` if given (refused, saying which to use, when
/// the chip is known to need the other), else the table's choice (ios18 for an unknown chip,
/// with a note).
pub fn choose_dialect(sub_type: Option<&str>, requested: Option<Dialect>) -> anyhow::Result<(Dialect, String)> {
    let chip = sub_type.and_then(lookup);
    let who = match (sub_type, chip) {
        (Some(s), Some(c)) => {
            format!("aneSubType {s} ({} generation{})", c.generation, if c.reported { "" } else { ", assumed" })
        }
        (Some(s), None) => format!("aneSubType {s} (not in the table)"),
        (None, _) => "an unreported chip".to_string(),
    };
    match (requested, chip) {
        (Some(Dialect::Ios18), Some(c)) if c.dialect == Dialect::Ios16 => anyhow::bail!(
            "{who} does not take the ios18 dialect (program 1.3 is reported to fail there): use --mil-dialect ios16"
        ),
        (Some(d), _) => Ok((d, format!("{} dialect (--mil-dialect) on {who}", d.name()))),
        (None, Some(c)) => Ok((c.dialect, format!("{} dialect, chosen for {who}", c.dialect.name()))),
        (None, None) => Ok((
            Dialect::Ios18,
            format!("ios18 dialect for {who}; if compiles fail, try --mil-dialect ios16 and report the chip"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sub_types_map_to_generations_longest_prefix_first() {
        assert_eq!(lookup("H16G").unwrap().generation, "M4");
        assert_eq!(lookup("aneSubType=h16g").unwrap().generation, "M4");
        assert_eq!(lookup("h16").unwrap().generation, "M5");
        assert_eq!(lookup("h17").unwrap().generation, "M5 Max");
        assert_eq!(lookup("h13g").unwrap().dialect, Dialect::Ios16);
        assert_eq!(lookup("H14").unwrap().dialect, Dialect::Ios16);
        assert!(lookup("h9").is_none() && lookup("").is_none());
    }

    #[test]
    fn the_wrong_dialect_for_a_chip_says_which_to_use() {
        let e = choose_dialect(Some("h13g"), Some(Dialect::Ios18)).unwrap_err().to_string();
        assert!(e.contains("--mil-dialect ios16") && e.contains("M1"), "{e}");
        assert_eq!(choose_dialect(Some("h13g"), None).unwrap().0, Dialect::Ios16);
        assert_eq!(choose_dialect(Some("H16G"), None).unwrap().0, Dialect::Ios18);
        // the older dialect on a newer chip is allowed (an override for experiments)
        assert_eq!(choose_dialect(Some("H16G"), Some(Dialect::Ios16)).unwrap().0, Dialect::Ios16);
        let (d, note) = choose_dialect(None, None).unwrap();
        assert_eq!(d, Dialect::Ios18);
        assert!(note.contains("ios16"), "{note}");
    }

    #[test]
    fn rated_peaks_are_consistent() {
        for c in &CHIPS {
            if let (Some(f), Some(i)) = (c.fp16_tflops, c.int8_tops) {
                assert_eq!(i, 2.0 * f, "{}", c.generation);
            }
        }
    }
}
