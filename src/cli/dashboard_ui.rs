//! Drawing the dashboard: header, loss chart, throughput, learning rate and gradient norm,
//! system, events, log and generated text, laid out for 80×24 and growing with the terminal.

use super::dashboard::App;
use anetrain::telemetry::RunLog;
use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::symbols::Marker;
use ratatui::text::{Line, Span};
use ratatui::widgets::{Axis, Block, Chart, Dataset, GraphType, Paragraph, Sparkline, Wrap};

pub const MIN_W: u16 = 80;
pub const MIN_H: u16 = 24;

/// Points drawn per curve at most (a braille cell holds 2 columns of dots).
const MAX_POINTS: usize = 600;

fn dim() -> Style {
    Style::default().fg(Color::DarkGray)
}

fn block(title: &str) -> Block<'_> {
    Block::bordered().title(Span::styled(title, Style::default().add_modifier(Modifier::BOLD)))
}

/// `1h02m`, `3m05s` or `12s`.
fn duration(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, s % 3600 / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

fn opt(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.filter(|x| x.is_finite()).map_or_else(|| "n/a".to_string(), f)
}

pub fn draw(f: &mut Frame, app: &App) {
    let area = f.area();
    if area.width < MIN_W || area.height < MIN_H {
        let msg = format!(
            "terminal too small: {}×{}; the dashboard needs at least {MIN_W}×{MIN_H} (q quits)",
            area.width, area.height
        );
        f.render_widget(Paragraph::new(msg).wrap(Wrap { trim: true }), area);
        return;
    }
    // Extra height goes 60/40 to the chart row and the text row.
    let extra = area.height - MIN_H;
    let rows = Layout::vertical([
        Constraint::Length(2),
        Constraint::Length(10 + extra * 3 / 5),
        Constraint::Length(4),
        Constraint::Min(8),
    ])
    .split(area);
    let right_w = 30.max(area.width * 3 / 10);
    let cols = |r: Rect| Layout::horizontal([Constraint::Min(40), Constraint::Length(right_w)]).split(r);
    header(f, rows[0], app);
    let (r1, r2, r3) = (cols(rows[1]), cols(rows[2]), cols(rows[3]));
    loss_chart(f, r1[0], app);
    throughput(f, r1[1], app);
    lr_grad(f, r2[0], &app.reader.log);
    system(f, r2[1], app);
    let left = Layout::vertical([Constraint::Length(4 + (r3[0].height - 8) / 3), Constraint::Min(4)]).split(r3[0]);
    events(f, left[0], &app.reader.log);
    log_panel(f, left[1], app);
    f.render_widget(Paragraph::new(app.sample.as_str()).wrap(Wrap { trim: false }).block(block("sample")), r3[1]);
}

fn header(f: &mut Frame, area: Rect, app: &App) {
    let log = &app.reader.log;
    let first = match log.header() {
        Some(h) => format!(
            "{} ({:.2}M params) on {} | {} ×{} | B={} T={} accum={} | lr {:.1e}→{:.1e} warmup {} | {}",
            h.model,
            h.params as f64 / 1e6,
            h.data,
            h.backend,
            h.threads,
            h.batch,
            h.seq,
            h.accum,
            h.lr,
            h.min_lr,
            h.warmup,
            if h.resumed_from.is_some() { format!("resumed at {}", h.start_step) } else { "fresh".into() }
        ),
        None => "waiting for the run's header…".to_string(),
    };
    let second = match app.reader.note() {
        // The log being written right now often ends mid-line for a moment: not worth a warning.
        Some(note) if !(app.reader.exists && log.bad_lines == 0 && note.contains("incomplete") && !app.attached()) => {
            // The file's name is enough here; the whole path would push the news off screen.
            let path = app.reader.path.display().to_string();
            let name = app.reader.path.file_name().map_or(path.clone(), |n| n.to_string_lossy().into_owned());
            Line::from(Span::styled(note.replacen(&path, &name, 1), Style::default().fg(Color::Yellow)))
        }
        _ => Line::from(vec![
            Span::styled(app.status.as_str(), Style::default().fg(Color::Green)),
            Span::styled("  q stop·quit  g generate  r restart  p auto-scroll  l log-y  ↑↓ scroll", dim()),
        ]),
    };
    f.render_widget(Paragraph::new(vec![Line::from(first), second]), area);
}

/// At most MAX_POINTS evenly spaced points, always including the last.
fn thin(points: Vec<(f64, f64)>) -> Vec<(f64, f64)> {
    if points.len() <= MAX_POINTS {
        return points;
    }
    let stride = points.len().div_ceil(MAX_POINTS);
    let last = *points.last().unwrap();
    let mut out: Vec<_> = points.into_iter().step_by(stride).collect();
    if out.last() != Some(&last) {
        out.push(last);
    }
    out
}

fn loss_chart(f: &mut Frame, area: Rect, app: &App) {
    let log = &app.reader.log;
    let y = |v: f64| if app.log_scale { v.ln() } else { v };
    let train = thin(log.updates.iter().filter(|u| u.loss.is_finite()).map(|u| (u.step as f64, y(u.loss))).collect());
    let val: Vec<(f64, f64)> =
        log.val_points().into_iter().filter(|p| p.1.is_finite()).map(|(s, v)| (s as f64, y(v))).collect();
    let title = if app.log_scale { "loss (log scale)" } else { "loss" };
    if train.is_empty() {
        f.render_widget(Paragraph::new("no updates yet").block(block(title)), area);
        return;
    }
    let (x0, x1) = (train[0].0.min(1.0), train.last().unwrap().0.max(train[0].0 + 1.0));
    let (mut y0, mut y1) =
        train.iter().chain(&val).fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| (a.min(p.1), b.max(p.1)));
    if y1 - y0 < 1e-9 {
        (y0, y1) = (y0 - 0.5, y1 + 0.5);
    }
    let label = |v: f64| if app.log_scale { format!("{:.3}", v.exp()) } else { format!("{v:.3}") };
    let last = log.updates.last().unwrap();
    let mut sets = vec![
        Dataset::default()
            .name(format!("train {:.4}", last.loss))
            .marker(Marker::Braille)
            .graph_type(GraphType::Line)
            .style(Style::default().fg(Color::Cyan))
            .data(&train),
    ];
    if let Some(v) = val.last() {
        let shown = if app.log_scale { v.1.exp() } else { v.1 };
        sets.push(
            Dataset::default()
                .name(format!("val {shown:.4}"))
                .marker(Marker::Dot)
                .graph_type(GraphType::Scatter)
                .style(Style::default().fg(Color::Yellow))
                .data(&val),
        );
    }
    let chart = Chart::new(sets)
        .block(block(title))
        .x_axis(Axis::default().bounds([x0, x1]).labels([format!("{x0:.0}"), format!("{x1:.0}")]).style(dim()))
        .y_axis(Axis::default().bounds([y0, y1]).labels([label(y0), label(y1)]).style(dim()))
        .legend_position(Some(ratatui::widgets::LegendPosition::TopRight));
    f.render_widget(chart, area);
}

fn throughput(f: &mut Frame, area: Rect, app: &App) {
    let log = &app.reader.log;
    let Some(u) = log.updates.last() else {
        f.render_widget(Paragraph::new("no updates yet").block(block("throughput")), area);
        return;
    };
    let h = log.header();
    let steps = h.map_or(u.step, |h| h.steps);
    // ETA from this process's pace: updates since its header over the time they took.
    let start_step = h.map_or(0, |h| h.start_step);
    let done_here = u.step.saturating_sub(start_step);
    let eta = if done_here > 0 && u.elapsed_s > 0.0 && log.report.is_none() {
        duration(u.elapsed_s / done_here as f64 * steps.saturating_sub(u.step) as f64)
    } else if log.report.is_some() {
        "done".into()
    } else {
        "n/a".into()
    };
    let gflops = h.map(|h| h.flops_per_token * u.tokens_per_s / 1e9);
    let peak = h.and_then(|h| h.gemm_peak_gflops);
    let share = match (gflops, peak) {
        (Some(g), Some(p)) if p > 0.0 => format!(" ({:.0}% of peak)", 100.0 * g / p),
        _ => String::new(),
    };
    let val = log.val_points().last().map_or(String::new(), |v| format!(" val {:.4}", v.1));
    let lines = vec![
        Line::from(format!("step {}/{steps} ({:.0}%)", u.step, 100.0 * u.step as f64 / steps.max(1) as f64)),
        Line::from(format!("loss {:.4}{val}", u.loss)),
        Line::from(format!("tok/s {:.0}  ETA {eta}", u.tokens_per_s)),
        Line::from(format!("ms: step {:.1} fwd {:.1}", u.ms_step, u.ms_forward)),
        Line::from(format!(" bwd {:.1} opt {:.1}", u.ms_backward, u.ms_optimizer)),
        Line::from(format!(" kern {:.1} dW {:.1} wait {:.1}", u.ms_kernels, u.ms_dw, u.ms_dw_wait)),
        Line::from(format!("{} GFLOP/s{share}", opt(gflops, |g| format!("{g:.2}")))),
        Line::from(format!("tokens {}", RunLog::tokens_at(u))),
    ];
    f.render_widget(Paragraph::new(lines).block(block("throughput")), area);
}

fn lr_grad(f: &mut Frame, area: Rect, log: &RunLog) {
    let outer = block("learning rate · gradient norm");
    let inner = outer.inner(area);
    f.render_widget(outer, area);
    let rows = Layout::vertical([Constraint::Length(1), Constraint::Length(1)]).split(inner);
    let label_w = 15;
    let width = inner.width.saturating_sub(label_w) as usize;
    let tail = &log.updates[log.updates.len().saturating_sub(width)..];
    let series = [
        ("lr", tail.iter().map(|u| u.lr).collect::<Vec<_>>(), Color::Magenta),
        ("gn", tail.iter().map(|u| u.grad_norm).collect::<Vec<_>>(), Color::Green),
    ];
    for (row, (name, values, color)) in rows.iter().zip(series) {
        let parts = Layout::horizontal([Constraint::Length(label_w), Constraint::Min(1)]).split(*row);
        let last = values.last().copied();
        let text = match name {
            "lr" => format!("lr {}", opt(last, |v| format!("{v:.2e}"))),
            _ => format!("gn {}", opt(last, |v| format!("{v:.3}"))),
        };
        f.render_widget(Paragraph::new(text), parts[0]);
        let max = values.iter().copied().filter(|v| v.is_finite()).fold(0.0, f64::max);
        let bars: Vec<u64> =
            values.iter().map(|&v| if v.is_finite() && max > 0.0 { (v / max * 100.0) as u64 } else { 0 }).collect();
        f.render_widget(Sparkline::default().data(&bars).max(100).style(Style::default().fg(color)), parts[1]);
    }
}

fn system(f: &mut Frame, area: Rect, app: &App) {
    let s = &app.sys;
    let mem = s.mem_mb.map_or("n/a".to_string(), |(t, a)| format!("{:.1}/{:.1}G", (t - a) / 1e3, t / 1e3));
    let power = s.power_w.map_or(s.power_note.to_string(), |w| format!("{w:.1} W"));
    let lines = vec![
        Line::from(format!(
            "cpu {} rss {}",
            opt(s.cpu_pct, |c| format!("{c:.0}%")),
            opt(s.rss_mb, |r| format!("{r:.0}M"))
        )),
        Line::from(format!("mem {mem} pwr {power}")),
    ];
    let title = format!("system (ui {:.1}%)", s.own_cpu_pct);
    f.render_widget(Paragraph::new(lines).block(block(&title)), area);
}

fn events(f: &mut Frame, area: Rect, log: &RunLog) {
    let mut items: Vec<(usize, String)> = Vec::new();
    for c in &log.checkpoints {
        items.push((c.step, format!("{:>6} checkpoint {} ({:.0} ms)", c.step, c.kind, c.ms)));
    }
    for e in &log.evals {
        let best = if e.improved { " best" } else { "" };
        items.push((e.step, format!("{:>6} eval val {:.4}{best}", e.step, e.val_loss)));
    }
    for e in &log.loss_scales {
        items.push((e.step, format!("{:>6} loss scale {}→{} ({})", e.step, e.from, e.to, e.reason)));
    }
    for u in log.updates.iter().filter(|u| u.skipped) {
        items.push((u.step, format!("{:>6} update skipped (non-finite gradient)", u.step)));
    }
    for h in log.headers.iter().skip(1) {
        items.push((h.start_step, format!("{:>6} resumed", h.start_step)));
    }
    if let Some(r) = &log.report {
        let how = if r.interrupted { "stopped" } else { "finished" };
        items.push((r.step, format!("{:>6} {how}: {:.0} tok/s, {:.1} s", r.step, r.tokens_per_s, r.wall_s)));
    }
    items.sort_by_key(|i| i.0);
    let inner_h = area.height.saturating_sub(2) as usize;
    let lines: Vec<Line> =
        items[items.len().saturating_sub(inner_h)..].iter().map(|i| Line::from(i.1.as_str())).collect();
    f.render_widget(Paragraph::new(lines).block(block("events")), area);
}

fn log_panel(f: &mut Frame, area: Rect, app: &App) {
    let inner_h = area.height.saturating_sub(2) as usize;
    let end = app.lines.len().saturating_sub(app.scroll);
    let start = end.saturating_sub(inner_h);
    let lines: Vec<Line> = app.lines.range(start..end).map(|l| Line::from(l.as_str())).collect();
    let title = if app.auto_scroll { "log".to_string() } else { format!("log (paused, {} up)", app.scroll) };
    f.render_widget(Paragraph::new(lines).block(block(&title)), area);
}
