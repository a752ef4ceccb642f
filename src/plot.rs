//! Plots of telemetry logs (`anetrain plot`, and `loss.png` in every checkpoint directory):
//! loss (train and validation) against updates and against tokens, learning rate, gradient
//! norm and tokens/s, several runs overlaid with a legend; and the same data as CSV.
//! Text uses the DejaVu Sans font compiled into the binary, so no system fonts are needed.

use crate::fsio::write_atomically;
use crate::telemetry::RunLog;
use anyhow::{Context, Result, anyhow};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::io::Write;
use std::path::Path;
use std::sync::Once;

/// Image size of a plot, in pixels.
pub const WIDTH: u32 = 1200;
pub const HEIGHT: u32 = 900;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Format {
    Png,
    Svg,
}

/// One run to draw: its legend name and its log.
pub struct Run<'a> {
    pub name: String,
    pub log: &'a RunLog,
}

const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(23, 190, 207),
    RGBColor(140, 86, 75),
    RGBColor(127, 127, 127),
];

fn register_fonts() {
    static FONTS: Once = Once::new();
    FONTS.call_once(|| {
        // The bundled fonts are valid TrueType; a failure would only mean text is not drawn.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular());
        let _ = plotters::style::register_font("sans-serif", FontStyle::Bold, dejavu::sans::bold());
    });
}

/// Draws the runs into `out` (written atomically).
pub fn write(runs: &[Run], out: &Path, format: Format) -> Result<()> {
    register_fonts();
    match format {
        Format::Png => {
            let (w, h) = (WIDTH as usize, HEIGHT as usize);
            let mut rgb = Vec::new();
            rgb.try_reserve_exact(w * h * 3).context("cannot allocate the plot image")?;
            rgb.resize(w * h * 3, 0);
            {
                let root = BitMapBackend::with_buffer(&mut rgb, (WIDTH, HEIGHT)).into_drawing_area();
                draw(&root, runs)?;
                root.present().map_err(|e| anyhow!("cannot draw the plot: {e}"))?;
            }
            write_atomically(out, |f| {
                let mut enc = png::Encoder::new(f, WIDTH, HEIGHT);
                enc.set_color(png::ColorType::Rgb);
                enc.set_depth(png::BitDepth::Eight);
                let mut writer = enc.write_header().map_err(std::io::Error::other)?;
                writer.write_image_data(&rgb).map_err(std::io::Error::other)?;
                writer.finish().map_err(std::io::Error::other)
            })
        }
        Format::Svg => {
            let mut svg = String::new();
            {
                let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
                draw(&root, runs)?;
                root.present().map_err(|e| anyhow!("cannot draw the plot: {e}"))?;
            }
            write_atomically(out, |f| f.write_all(svg.as_bytes()))
        }
    }
}

/// A panel's curves: (legend label, color, dashed, points).
type Curves = Vec<(String, RGBColor, bool, Vec<(f64, f64)>)>;

fn draw<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, runs: &[Run]) -> Result<()> {
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("cannot draw the plot: {e}");
    root.fill(&WHITE).map_err(err)?;
    let panels = root.split_evenly((3, 2));
    let curves = |f: &dyn Fn(&RunLog) -> Vec<(f64, f64)>| -> Curves {
        runs.iter().enumerate().map(|(i, r)| (r.name.clone(), COLORS[i % COLORS.len()], false, f(r.log))).collect()
    };
    let loss_curves = |by_tokens: bool| -> Curves {
        let mut out = Curves::new();
        for (i, r) in runs.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            let x_of = |step: usize| -> f64 {
                if !by_tokens {
                    return step as f64;
                }
                // Validation happens after an update: plot it at that update's tokens.
                r.log.updates.iter().find(|u| u.step == step).map_or(f64::NAN, |u| RunLog::tokens_at(u) as f64)
            };
            let train = r.log.updates.iter().map(|u| (x_of(u.step), u.loss)).collect();
            out.push((format!("{} train", r.name), color, false, train));
            let val: Vec<_> = r.log.val_points().into_iter().map(|(s, v)| (x_of(s), v)).collect();
            if !val.is_empty() {
                out.push((format!("{} val", r.name), color, true, val));
            }
        }
        out
    };
    panel(&panels[0], "loss vs updates", "update", &loss_curves(false), true).map_err(err)?;
    panel(&panels[1], "loss vs tokens", "tokens", &loss_curves(true), false).map_err(err)?;
    let lr = curves(&|l| l.updates.iter().map(|u| (u.step as f64, u.lr)).collect());
    panel(&panels[2], "learning rate", "update", &lr, false).map_err(err)?;
    let gn = curves(&|l| l.updates.iter().map(|u| (u.step as f64, u.grad_norm)).collect());
    panel(&panels[3], "gradient norm (before clipping)", "update", &gn, false).map_err(err)?;
    let tps = curves(&|l| l.updates.iter().map(|u| (u.step as f64, u.tokens_per_s)).collect());
    panel(&panels[4], "tokens/s", "update", &tps, false).map_err(err)?;
    summary(&panels[5], runs).map_err(err)?;
    Ok(())
}

/// Finite range of the values, padded so that a flat series still has height.
fn range(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    let (lo, hi) =
        values.filter(|v| v.is_finite()).fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
    if lo > hi {
        return None;
    }
    let pad = if hi > lo { (hi - lo) * 0.05 } else { lo.abs().max(1e-12) * 0.1 };
    Some((lo - pad, hi + pad))
}

fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    title: &str,
    x_label: &str,
    curves: &Curves,
    legend: bool,
) -> std::result::Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let finite = |p: &&(f64, f64)| p.0.is_finite() && p.1.is_finite();
    let xs = range(curves.iter().flat_map(|c| c.3.iter().filter(finite).map(|p| p.0)));
    let ys = range(curves.iter().flat_map(|c| c.3.iter().filter(finite).map(|p| p.1)));
    let (Some((x0, x1)), Some((y0, y1))) = (xs, ys) else {
        let style = ("sans-serif", 16).into_font().color(&BLACK);
        area.draw_text(&format!("{title}: no data yet"), &style, (20, 20))?;
        return Ok(());
    };
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 16))
        .margin(8)
        .x_label_area_size(32)
        .y_label_area_size(60)
        .build_cartesian_2d(x0.max(0.0)..x1, y0..y1)?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .x_labels(6)
        .y_labels(6)
        .x_label_formatter(&|v| short(*v))
        .y_label_formatter(&|v| short(*v))
        .label_style(("sans-serif", 12))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()?;
    for (label, color, dashed, points) in curves {
        let pts: Vec<(f64, f64)> = points.iter().filter(finite).copied().collect();
        let color = *color;
        let series = if *dashed {
            chart.draw_series(DashedLineSeries::new(pts.clone(), 6, 4, color.stroke_width(2)))?;
            chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))?
        } else {
            chart.draw_series(LineSeries::new(pts, color.stroke_width(2)))?
        };
        if legend {
            series
                .label(label.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
        }
    }
    if legend {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(180, 180, 180))
            .label_font(("sans-serif", 13))
            .position(SeriesLabelPosition::UpperRight)
            .draw()?;
    }
    Ok(())
}

/// Compact axis labels: 1.2k, 3.4M, 0.0003 as 3.0e-4.
fn short(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if a >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if a >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if a >= 10.0 {
        format!("{v:.0}")
    } else if a >= 0.1 {
        format!("{v:.2}")
    } else {
        format!("{v:.1e}")
    }
}

/// The sixth panel: one block of text per run.
fn summary<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    runs: &[Run],
) -> std::result::Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let mut y = 16;
    for (i, r) in runs.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let bold = ("sans-serif", 15).into_font().style(FontStyle::Bold).color(&color);
        area.draw_text(&r.name, &bold, (16, y))?;
        y += 20;
        let plain = ("sans-serif", 13).into_font().color(&BLACK);
        for line in run_lines(r.log) {
            area.draw_text(&line, &plain, (24, y))?;
            y += 17;
        }
        y += 8;
    }
    Ok(())
}

/// What the summary panel says about a run.
fn run_lines(log: &RunLog) -> Vec<String> {
    let mut lines = Vec::new();
    if let Some(h) = log.header() {
        lines.push(format!("{} ({} params), backend {}, {} threads", h.model, h.params, h.backend, h.threads));
        lines
            .push(format!("B={} T={} accum={}, lr {:.1e}, {} updates planned", h.batch, h.seq, h.accum, h.lr, h.steps));
    }
    if let Some(last) = log.updates.last() {
        lines.push(format!("after {} updates: loss {:.4}, {} tokens", last.step, last.loss, RunLog::tokens_at(last)));
    }
    if let Some(best) = log.val_points().iter().map(|p| p.1).filter(|v| v.is_finite()).reduce(f64::min) {
        lines.push(format!("best validation loss {best:.4}"));
    }
    if let Some(r) = &log.report {
        lines.push(format!("{:.0} tokens/s, {:.1} GFLOP/s over {:.1} s", r.tokens_per_s, r.gflops, r.wall_s));
    }
    lines
}

/// Writes every run's updates as CSV: one row per update, the run's name first.
pub fn write_csv(runs: &[Run], out: &Path) -> Result<()> {
    write_atomically(out, |f| {
        writeln!(
            f,
            "run,step,tokens_seen,loss,val_loss,lr,grad_norm,skipped,loss_scale,tokens_per_s,ms_step,\
             ms_forward,ms_backward,ms_optimizer,ms_kernels,ms_dw,ms_dw_wait,elapsed_s,rss_mb,cpu_s"
        )?;
        let num = |v: f64| if v.is_finite() { format!("{v}") } else { String::new() };
        for r in runs {
            let name = format!("\"{}\"", r.name.replace('"', "\"\""));
            for u in &r.log.updates {
                let val = r.log.evals.iter().find(|e| e.step == u.step).map(|e| e.val_loss).or(u.val_loss);
                writeln!(
                    f,
                    "{name},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
                    u.step,
                    RunLog::tokens_at(u),
                    num(u.loss),
                    val.map_or(String::new(), num),
                    num(u.lr),
                    num(u.grad_norm),
                    u.skipped,
                    num(u.loss_scale),
                    num(u.tokens_per_s),
                    num(u.ms_step),
                    num(u.ms_forward),
                    num(u.ms_backward),
                    num(u.ms_optimizer),
                    num(u.ms_kernels),
                    num(u.ms_dw),
                    num(u.ms_dw_wait),
                    num(u.elapsed_s),
                    num(u.rss_mb),
                    num(u.cpu_s),
                )?;
            }
        }
        Ok(())
    })
}
