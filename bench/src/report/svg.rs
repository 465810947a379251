//! `throughput.svg`: a hand-written horizontal bar chart, no plotting dependency.

use std::fmt::Write as _;

use super::Report;

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A horizontal bar chart of median msgs/s per scenario.
pub fn render(report: &Report) -> String {
    let bars: Vec<(&str, f64, bool)> = report
        .scenarios
        .iter()
        .filter_map(|r| {
            let rate = r.median.as_ref()?.msgs_per_s;
            Some((r.name.as_str(), rate, r.runner.starts_with("mailroom")))
        })
        .collect();
    let max = bars.iter().map(|b| b.1).fold(1.0, f64::max);
    let (label_w, chart_w, bar_h, gap, top) = (260.0, 560.0, 20.0, 8.0, 56.0);
    let width = label_w + chart_w + 110.0;
    let height = top + bars.len() as f64 * (bar_h + gap) + 30.0;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="10" y="20" font-size="15" font-weight="bold">Throughput (msgs/s, median of {} round(s))</text>"#,
        report.settings.rounds
    );
    let _ = writeln!(
        svg,
        r##"<text x="10" y="38" fill="#555">{}</text>"##,
        xml_escape(&format!(
            "{} cores, {}; nats-server {}; blue = Mailroom, grey = native async-nats",
            report.machine.cores, report.machine.cpu_model, report.machine.nats_server_version
        ))
    );
    for (i, (name, rate, mailroom)) in bars.iter().enumerate() {
        let y = top + i as f64 * (bar_h + gap);
        let w = (rate / max * chart_w).max(1.0);
        let fill = if *mailroom { "#2e86de" } else { "#8395a7" };
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#,
            label_w - 8.0,
            y + bar_h * 0.7,
            xml_escape(name)
        );
        let _ = writeln!(
            svg,
            r#"<rect x="{label_w}" y="{y}" width="{w:.1}" height="{bar_h}" fill="{fill}"/>"#
        );
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{}">{rate:.0}</text>"#,
            label_w + w + 6.0,
            y + bar_h * 0.7
        );
    }
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes() {
        assert_eq!(xml_escape("a<b&\"c\">"), "a&lt;b&amp;&quot;c&quot;&gt;");
    }
}
