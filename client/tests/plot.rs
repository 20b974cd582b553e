//! `synopsis plot` drawing: a fixed run rendered to SVG and PNG gives real, labelled pictures.

mod common;

use synopsis_cli::plot::{render, Format, LossCurves};
use synopsis_proto::v1::RunState;

#[test]
fn curves_come_from_step_epoch_and_checkpoint_events() {
    let curves = LossCurves::from_events(&common::run_events("run-1", Some(RunState::Completed)));
    assert_eq!(curves.run_id, "run-1");
    assert_eq!(curves.train.len(), 8);
    assert_eq!(curves.train[0], (1.0, 5.6));
    assert_eq!(curves.validation, vec![(4.0, 4.5), (8.0, 4.0)]);
    assert_eq!(curves.checkpoints, vec![4.0, 8.0]);
}

#[test]
fn renders_svg_with_every_series() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("loss.svg");
    let curves = LossCurves::from_events(&common::run_events("run-1", Some(RunState::Completed)));
    render(&curves, &path, Format::Svg, (900, 500)).expect("renders");
    let svg = std::fs::read_to_string(&path).expect("svg written");
    assert!(svg.len() > 5_000, "{} bytes", svg.len());
    for text in [
        "training loss",
        "validation loss",
        "checkpoint",
        "step",
        "run-1",
    ] {
        assert!(svg.contains(text), "the SVG shows `{text}`");
    }
    // Raw and smoothed training loss, validation loss, and dashes of two checkpoint lines.
    assert!(svg.matches("<polyline").count() >= 3);
    assert!(
        svg.matches("<circle").count() >= 2,
        "validation points are marked"
    );
}

#[test]
fn renders_png() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("loss.png");
    let curves = LossCurves::from_events(&common::run_events("run-1", None));
    render(&curves, &path, Format::Png, (900, 500)).expect("renders");
    let png = std::fs::read(&path).expect("png written");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"));
    assert!(png.len() > 10_000, "{} bytes", png.len());
}
