//! The SVG figure: throughput per target (left) and latency CDFs (right, log-x).

use std::path::Path;

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::report::{Report, TargetReport};

const WIDTH: u32 = 1400;
const HEIGHT: u32 = 560;

impl Report {
    /// Writes the figure (throughput bars, latency CDFs) as SVG, e.g. from a report read back
    /// from its JSON. Skipped targets are left out.
    pub fn write_svg(&self, path: &Path) -> Result<(), crate::BenchError> {
        write_svg(self, path).map_err(|reason| crate::BenchError::Plot {
            path: path.to_path_buf(),
            reason,
        })
    }
}

pub(crate) fn write_svg(report: &Report, path: &Path) -> Result<(), String> {
    let measured: Vec<&TargetReport> = report
        .targets
        .iter()
        .filter(|t| t.skipped.is_none())
        .collect();
    let root = SVGBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    draw(&root, report, &measured).map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())
}

/// One colour per mode, so the same target looks the same in every run's figure; URL
/// targets (there may be several) take the remaining colours in turn.
fn color(target: &TargetReport, index: usize) -> RGBColor {
    const URLS: [RGBColor; 4] = [
        RGBColor(0x94, 0x67, 0xbd),
        RGBColor(0x8c, 0x56, 0x4b),
        RGBColor(0x17, 0xbe, 0xcf),
        RGBColor(0xe3, 0x77, 0xc2),
    ];
    match target.mode.as_str() {
        "ceiling" => RGBColor(0x55, 0x55, 0x55),
        "userspace" => RGBColor(0x1f, 0x77, 0xb4),
        "sockmap" => RGBColor(0x2c, 0xa0, 0x2c),
        "knative" => RGBColor(0xff, 0x7f, 0x0e),
        _ => URLS[index % URLS.len()],
    }
}

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, plotters::coord::Shift>,
    report: &Report,
    measured: &[&TargetReport],
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    root.fill(&WHITE)?;
    let load = match report.options.rate {
        Some(rate) => format!("open loop {rate} req/s"),
        None => "closed loop".into(),
    };
    let title = format!(
        "spindle bench: {} connections, {load}, {} s ({} cores, {})",
        report.options.connections,
        report.options.duration_s,
        report.machine.cores,
        report.machine.date
    );
    let root = root.titled(&title, ("sans-serif", 22))?;
    let (left, right) = root.split_horizontally(WIDTH * 2 / 5);

    // Throughput bars.
    let n = measured.len().max(1);
    let top = measured
        .iter()
        .filter_map(|t| t.rps)
        .fold(0.0, f64::max)
        .max(1.0)
        * 1.15;
    let mut bars = ChartBuilder::on(&left)
        .caption("Throughput (successful requests/s)", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..n as f64, 0f64..top)?;
    bars.configure_mesh()
        .disable_x_mesh()
        .disable_x_axis()
        .y_desc("requests/s")
        .y_label_formatter(&|v| format!("{:.0}", v))
        .draw()?;
    let above_bar = ("sans-serif", 14)
        .into_font()
        .into_text_style(&left)
        .pos(Pos::new(HPos::Center, VPos::Bottom));
    for (i, t) in measured.iter().enumerate() {
        let rps = t.rps.unwrap_or(0.0);
        let x = i as f64;
        let c = color(t, i);
        bars.draw_series(std::iter::once(Rectangle::new(
            [(x + 0.15, 0.0), (x + 0.85, rps)],
            c.filled(),
        )))?
        .label(t.name.as_str())
        .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], c.filled()));
        bars.draw_series(std::iter::once(Text::new(
            format!("{:.0}", rps),
            (x + 0.5, rps + top * 0.01),
            above_bar.clone(),
        )))?;
    }
    bars.configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .draw()?;

    // Latency CDFs.
    let points: Vec<(usize, Vec<(f64, f64)>)> = measured
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let cdf = t
                .cdf
                .iter()
                .flatten()
                .map(|p| (p.us.max(1) as f64, p.q))
                .collect();
            (i, cdf)
        })
        .collect();
    let (lo, hi) = points
        .iter()
        .flat_map(|(_, c)| c.iter().map(|p| p.0))
        .fold((f64::MAX, 1.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let lo = if lo == f64::MAX {
        1.0
    } else {
        (lo / 1.5).max(1.0)
    };
    let hi = (hi * 1.5).max(lo * 10.0);
    let mut cdf = ChartBuilder::on(&right)
        .caption("Latency CDF (successful requests)", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(55)
        .build_cartesian_2d((lo..hi).log_scale(), 0f64..1.0)?;
    cdf.configure_mesh()
        .x_desc("latency, µs (log scale)")
        .y_desc("fraction of requests")
        .x_label_formatter(&|v| format!("{:.0}", v))
        .draw()?;
    for (i, line) in points {
        let c = color(measured[i], i);
        cdf.draw_series(LineSeries::new(line, c.stroke_width(2)))?
            .label(measured[i].name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], c.stroke_width(2)));
    }
    cdf.configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .draw()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_an_svg_with_both_panels_and_the_target_names() {
        let report = crate::report::tests::synthetic();
        let dir = std::env::temp_dir().join(format!("spindle-bench-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bench.svg");
        write_svg(&report, &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(100)]);
        assert!(svg.contains("Throughput"));
        assert!(svg.contains("Latency CDF"));
        assert!(svg.contains("Spindle userspace"));
        assert!(svg.contains("hyper hello-world (ceiling)"));
        // The skipped sockmap target is not drawn.
        assert!(!svg.contains("Spindle sockmap"));
        // One polyline per measured target's CDF.
        assert!(svg.matches("<polyline").count() >= 4, "{svg}");
    }

    #[test]
    fn reports_an_unwritable_path() {
        let report = crate::report::tests::synthetic();
        let err = write_svg(&report, Path::new("/nonexistent-dir/x.svg")).unwrap_err();
        assert!(!err.is_empty());
    }
}
