//! Where a report goes: `report.json` (everything measured, for tools) and `report.html` (the
//! same for people) in the output directory.

use std::path::{Path, PathBuf};

use crate::CalibrateError;
use crate::report::Report;

/// Writes `report.json` and `report.html` into `dir` (made if missing); returns their paths.
pub fn write(report: &Report, dir: &Path) -> Result<(PathBuf, PathBuf), CalibrateError> {
    let file_error = |what: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source| CalibrateError::ReportFile { what, path, source }
    };
    std::fs::create_dir_all(dir).map_err(file_error("creating the report directory", dir))?;
    let json_path = dir.join("report.json");
    let json = serde_json::to_vec_pretty(report).map_err(CalibrateError::ReportJson)?;
    std::fs::write(&json_path, json).map_err(file_error("writing", &json_path))?;
    let html_path = dir.join("report.html");
    std::fs::write(&html_path, crate::html::render(report)).map_err(file_error("writing", &html_path))?;
    Ok((json_path, html_path))
}
