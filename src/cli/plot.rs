//! `anetrain plot`: telemetry logs drawn as PNG or SVG, or exported as CSV.

use anetrain::plot::{self, Format, Run};
use anetrain::telemetry::LogReader;
use anyhow::{Result, bail};
use std::path::{Path, PathBuf};

/// Legend names: the file stems, with the parent directory added where two stems collide.
fn names(logs: &[PathBuf]) -> Vec<String> {
    let stem = |p: &Path| p.file_stem().map_or_else(|| p.display().to_string(), |s| s.to_string_lossy().into_owned());
    let stems: Vec<String> = logs.iter().map(|p| stem(p)).collect();
    logs.iter()
        .zip(&stems)
        .map(|(p, s)| {
            if stems.iter().filter(|t| *t == s).count() > 1 {
                p.with_extension("").display().to_string()
            } else {
                s.clone()
            }
        })
        .collect()
}

pub fn plot(logs: &[PathBuf], out: Option<PathBuf>, svg: bool, csv: bool) -> Result<()> {
    let mut read = Vec::new();
    for path in logs {
        let (log, note) = LogReader::read_all(path)?;
        if let Some(note) = note {
            eprintln!("note: {note}");
        }
        read.push(log);
    }
    if read.iter().all(|l| l.updates.is_empty()) {
        bail!("no updates to plot in {}", logs.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "));
    }
    let runs: Vec<Run> = names(logs).into_iter().zip(&read).map(|(name, log)| Run { name, log }).collect();
    let default = if csv {
        "telemetry.csv"
    } else if svg {
        "loss.svg"
    } else {
        "loss.png"
    };
    let out = out.unwrap_or_else(|| PathBuf::from(default));
    if csv {
        plot::write_csv(&runs, &out)?;
    } else {
        plot::write(&runs, &out, if svg { Format::Svg } else { Format::Png })?;
    }
    let updates: usize = read.iter().map(|l| l.updates.len()).sum();
    println!("wrote {} ({} runs, {updates} updates)", out.display(), runs.len());
    Ok(())
}
