//! `synopsis plot`: a run's loss curves as a picture. Training loss per step (raw, faint, and
//! smoothed), validation loss per epoch (x = step), and a dashed line at every checkpoint, drawn
//! with plotters into PNG or SVG. Text is set in an embedded DejaVu Sans subset (see
//! assets/README.md), so the picture is labelled on machines without any system font.

use std::path::Path;
use std::sync::Once;
use std::time::Duration;

use anyhow::anyhow;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::series::DashedLineSeries;
use serde_json::json;
use synopsis_proto::v1::{train_event, TrainEvent, WatchRunRequest};

use crate::cli::PlotArgs;
use crate::connect::{CliError, Servers, Service};
use crate::output;

static FONT: &[u8] = include_bytes!("../assets/DejaVuSans-subset.ttf");
/// A running run replays its history at once, then goes quiet: this much silence ends reading.
const IDLE: Duration = Duration::from_millis(300);
/// The first event may take longer (the trainer opens the run's log).
const FIRST_EVENT_WAIT: Duration = Duration::from_secs(10);

const TRAIN_RAW: RGBColor = RGBColor(160, 190, 230);
const TRAIN_SMOOTH: RGBColor = RGBColor(31, 94, 180);
const VALIDATION: RGBColor = RGBColor(214, 72, 40);
const CHECKPOINT: RGBColor = RGBColor(110, 110, 110);

/// The curves of one run, extracted from its events.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LossCurves {
    pub run_id: String,
    /// (step, training loss) of every step event.
    pub train: Vec<(f64, f64)>,
    /// (step, validation loss) at the end of each epoch.
    pub validation: Vec<(f64, f64)>,
    /// Steps at which checkpoints were written.
    pub checkpoints: Vec<f64>,
}

impl LossCurves {
    pub fn from_events(events: &[TrainEvent]) -> Self {
        let mut curves = LossCurves::default();
        for e in events {
            if curves.run_id.is_empty() {
                curves.run_id = e.run_id.clone();
            }
            match &e.event {
                Some(train_event::Event::Step(s)) if s.loss.is_finite() => {
                    curves.train.push((s.step as f64, s.loss));
                }
                Some(train_event::Event::Epoch(ep)) if ep.val_loss.is_finite() => {
                    curves.validation.push((ep.step as f64, ep.val_loss));
                }
                Some(train_event::Event::Checkpoint(c)) => curves.checkpoints.push(c.step as f64),
                _ => {}
            }
        }
        curves
    }

    fn is_empty(&self) -> bool {
        self.train.is_empty() && self.validation.is_empty()
    }
}

pub async fn plot(servers: &Servers, args: &PlotArgs, json: bool) -> anyhow::Result<()> {
    let format = Format::of(&args.out)?;
    let events = collect(servers, &args.run).await?;
    let curves = LossCurves::from_events(&events);
    if curves.is_empty() {
        anyhow::bail!("run {} has no loss to plot yet", args.run);
    }
    render(&curves, &args.out, format, (args.width, args.height))?;
    if json {
        output::emit(&json!({
            "file": args.out.display().to_string(),
            "run_id": args.run,
            "steps": curves.train.len(),
            "validation_points": curves.validation.len(),
            "checkpoints": curves.checkpoints.len(),
        }))?;
    } else {
        println!(
            "wrote {}: {}, {}, {}",
            args.out.display(),
            count(curves.train.len(), "step"),
            count(curves.validation.len(), "validation point"),
            count(curves.checkpoints.len(), "checkpoint")
        );
    }
    Ok(())
}

fn count(n: usize, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

/// Replays the run from its first event until it finished, or until the replay of a running
/// run is exhausted.
async fn collect(servers: &Servers, run: &str) -> anyhow::Result<Vec<TrainEvent>> {
    let mut client = servers.trainer().await?;
    let mut stream = client
        .watch_run(WatchRunRequest {
            run_id: run.to_string(),
            from_seq: 0,
        })
        .await
        .map_err(|s| servers.status_error(Service::Trainer, s))?
        .into_inner();
    let mut events = Vec::new();
    loop {
        let wait = if events.is_empty() {
            FIRST_EVENT_WAIT
        } else {
            IDLE
        };
        match tokio::time::timeout(wait, stream.message()).await {
            Err(_) | Ok(Ok(None)) => break,
            Ok(Ok(Some(event))) => {
                let finished = matches!(event.event, Some(train_event::Event::Finished(_)));
                events.push(event);
                if finished {
                    break;
                }
            }
            Ok(Err(status)) => return Err(servers.status_error(Service::Trainer, status).into()),
        }
    }
    Ok(events)
}

/// Picture formats `plot` writes, chosen by the file's extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Png,
    Svg,
}

impl Format {
    pub fn of(path: &Path) -> Result<Self, CliError> {
        let ext = path
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase());
        match ext.as_deref() {
            Some("png") => Ok(Format::Png),
            Some("svg") => Ok(Format::Svg),
            _ => Err(CliError::Usage(format!(
                "cannot tell the picture format of {}: name it .png or .svg",
                path.display()
            ))),
        }
    }
}

/// Draws `curves` into `path`.
pub fn render(
    curves: &LossCurves,
    path: &Path,
    format: Format,
    size: (u32, u32),
) -> anyhow::Result<()> {
    register_font()?;
    match format {
        Format::Png => {
            let root = BitMapBackend::new(path, size).into_drawing_area();
            draw(&root, curves)?;
            root.present()
                .map_err(|e| anyhow!("cannot write {}: {e}", path.display()))
        }
        Format::Svg => {
            let root = SVGBackend::new(path, size).into_drawing_area();
            draw(&root, curves)?;
            root.present()
                .map_err(|e| anyhow!("cannot write {}: {e}", path.display()))
        }
    }
}

fn register_font() -> anyhow::Result<()> {
    static REGISTER: Once = Once::new();
    let mut ok = true;
    REGISTER.call_once(|| {
        ok = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).is_ok();
    });
    if ok {
        Ok(())
    } else {
        Err(anyhow!("the embedded plot font is not a valid font"))
    }
}

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    curves: &LossCurves,
) -> anyhow::Result<()> {
    let fail = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("cannot draw the plot: {e}");
    root.fill(&WHITE).map_err(fail)?;
    let (x_range, y_range) = ranges(curves);
    let y_decimals = if y_range.end - y_range.start < 1.0 {
        2
    } else {
        1
    };
    let title = if curves.run_id.is_empty() {
        "loss".to_string()
    } else {
        format!("{} — loss", curves.run_id)
    };
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 24))
        .margin(18)
        .x_label_area_size(48)
        .y_label_area_size(64)
        .build_cartesian_2d(x_range.clone(), y_range.clone())
        .map_err(fail)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("loss")
        .axis_desc_style(("sans-serif", 18))
        .label_style(("sans-serif", 14))
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.*}", y_decimals))
        .light_line_style(RGBColor(238, 238, 238))
        .bold_line_style(RGBColor(215, 215, 215))
        .draw()
        .map_err(fail)?;

    for (i, &step) in curves.checkpoints.iter().enumerate() {
        let line = DashedLineSeries::new(
            [(step, y_range.start), (step, y_range.end)],
            6,
            4,
            CHECKPOINT.stroke_width(1),
        );
        let series = chart.draw_series(line).map_err(fail)?;
        if i == 0 {
            series.label("checkpoint").legend(|(x, y)| {
                PathElement::new([(x, y), (x + 20, y)], CHECKPOINT.stroke_width(1))
            });
        }
    }
    let smoothed = smooth(&curves.train);
    if smoothed != curves.train {
        chart
            .draw_series(LineSeries::new(
                curves.train.iter().copied(),
                TRAIN_RAW.stroke_width(1),
            ))
            .map_err(fail)?
            .label("training loss")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], TRAIN_RAW.stroke_width(3)));
        chart
            .draw_series(LineSeries::new(smoothed, TRAIN_SMOOTH.stroke_width(2)))
            .map_err(fail)?
            .label("training loss (smoothed)")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], TRAIN_SMOOTH.stroke_width(2)));
    } else if !curves.train.is_empty() {
        // Too few steps to smooth: the raw curve is the trend.
        chart
            .draw_series(LineSeries::new(smoothed, TRAIN_SMOOTH.stroke_width(2)))
            .map_err(fail)?
            .label("training loss")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], TRAIN_SMOOTH.stroke_width(2)));
    }
    if !curves.validation.is_empty() {
        chart
            .draw_series(LineSeries::new(
                curves.validation.iter().copied(),
                VALIDATION.stroke_width(2),
            ))
            .map_err(fail)?
            .label("validation loss")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], VALIDATION.stroke_width(2)));
        chart
            .draw_series(
                curves
                    .validation
                    .iter()
                    .map(|&p| Circle::new(p, 4, VALIDATION.filled())),
            )
            .map_err(fail)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font(("sans-serif", 15))
        .background_style(WHITE.mix(0.9))
        .border_style(RGBColor(200, 200, 200))
        .draw()
        .map_err(fail)?;
    Ok(())
}

/// Axis ranges that hold every point, with a little air above and below.
fn ranges(curves: &LossCurves) -> (std::ops::Range<f64>, std::ops::Range<f64>) {
    let points = curves.train.iter().chain(&curves.validation);
    let xs = points
        .clone()
        .map(|p| p.0)
        .chain(curves.checkpoints.iter().copied());
    let x_min = xs.clone().fold(f64::INFINITY, f64::min).min(0.0);
    let x_last = xs.fold(f64::NEG_INFINITY, f64::max).max(x_min + 1.0);
    // A little room on the right, so the last point and checkpoint are not drawn on the frame.
    let x_max = x_last + (x_last - x_min) * 0.02;
    let y_min = points.clone().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let y_max = points.map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
    let (y_min, y_max) = if y_min.is_finite() && y_max.is_finite() {
        (y_min, y_max)
    } else {
        (0.0, 1.0)
    };
    let pad = ((y_max - y_min) * 0.06).max(0.05);
    (x_min..x_max, (y_min - pad).max(0.0)..(y_max + pad))
}

/// Centred moving average: per-step loss is noisy, the trend is what a reader wants, and a
/// centred window (unlike an exponential average) does not lag behind it. The window grows
/// with the run (about 1/40 of its steps) and shrinks at both ends.
pub fn smooth(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let half = points.len() / 80;
    let mut prefix = Vec::with_capacity(points.len() + 1);
    prefix.push(0.0);
    for (i, p) in points.iter().enumerate() {
        prefix.push(prefix[i] + p.1);
    }
    (0..points.len())
        .map(|i| {
            let lo = i.saturating_sub(half);
            let hi = (i + half + 1).min(points.len());
            (points[i].0, (prefix[hi] - prefix[lo]) / (hi - lo) as f64)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smoothing_keeps_a_constant_and_follows_a_trend() {
        let flat: Vec<_> = (0..100).map(|i| (i as f64, 3.0)).collect();
        assert!(smooth(&flat).iter().all(|p| (p.1 - 3.0).abs() < 1e-9));
        let falling: Vec<_> = (0..100)
            .map(|i| (i as f64, 10.0 - i as f64 * 0.05))
            .collect();
        let s = smooth(&falling);
        assert!(s[99].1 < s[50].1 && s[50].1 < s[1].1);
    }

    #[test]
    fn format_follows_the_extension() {
        assert_eq!(Format::of(Path::new("a/loss.PNG")).ok(), Some(Format::Png));
        assert_eq!(Format::of(Path::new("loss.svg")).ok(), Some(Format::Svg));
        assert!(Format::of(Path::new("loss.jpg")).is_err());
    }
}
