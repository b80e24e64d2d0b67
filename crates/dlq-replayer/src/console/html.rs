//! Building the console's HTML by hand: every value that is not markup goes through
//! [`e`], which escapes it as it is written, so a dead letter's error or payload can never
//! become markup. Also the page frame, and small SVG charts drawn on the server.

use std::fmt::{self, Display, Write};

/// A value written HTML-escaped (text and attribute values alike).
pub struct Escaped<T>(pub T);

/// Escapes `value` as it is formatted.
pub fn e<T: Display>(value: T) -> Escaped<T> {
    Escaped(value)
}

impl<T: Display> Display for Escaped<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct Out<'a, 'b>(&'a mut fmt::Formatter<'b>);
        impl Write for Out<'_, '_> {
            fn write_str(&mut self, s: &str) -> fmt::Result {
                let mut last = 0;
                for (i, c) in s.char_indices() {
                    let rep = match c {
                        '&' => "&amp;",
                        '<' => "&lt;",
                        '>' => "&gt;",
                        '"' => "&quot;",
                        '\'' => "&#39;",
                        _ => continue,
                    };
                    self.0.write_str(&s[last..i])?;
                    self.0.write_str(rep)?;
                    last = i + c.len_utf8();
                }
                self.0.write_str(&s[last..])
            }
        }
        write!(Out(f), "{}", self.0)
    }
}

/// `value` percent-encoded for a URL's query string.
pub fn q(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// The pages of the navigation bar.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Nav {
    Overview,
    DeadLetters,
    Events,
    Spend,
    None,
}

/// What the frame needs to know about who is looking.
pub struct Viewer<'a> {
    pub role: &'a str,
    pub csrf: &'a str,
}

/// A whole page: the frame around `main` (already markup). `refresh_secs` makes the page
/// reload its `<main>` in place every so often.
pub fn page(title: &str, nav: Nav, viewer: Option<&Viewer<'_>>, refresh_secs: Option<u64>, main: &str) -> String {
    let mut out = String::with_capacity(main.len() + 2048);
    let _ = write!(
        out,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{} · enrichment console</title>\
         <link rel=\"stylesheet\" href=\"/ui/assets/console.css\">\
         <script src=\"/ui/assets/console.js\" defer></script></head><body>\
         <a class=\"skip\" href=\"#main\">Skip to content</a><header><span class=\"brand\">enrichment console</span>",
        e(title)
    );
    if let Some(v) = viewer {
        out.push_str("<nav aria-label=\"Pages\"><ul>");
        for (item, href, label) in [
            (Nav::Overview, "/ui", "Overview"),
            (Nav::DeadLetters, "/ui/dead-letters", "Dead letters"),
            (Nav::Events, "/ui/events", "Events"),
            (Nav::Spend, "/ui/spend", "Spend"),
        ] {
            let current = if item == nav { " aria-current=\"page\"" } else { "" };
            let _ = write!(out, "<li><a href=\"{href}\"{current}>{label}</a></li>");
        }
        let _ = write!(
            out,
            "</ul></nav><form class=\"logout\" method=\"post\" action=\"/ui/logout\">\
             <input type=\"hidden\" name=\"csrf\" value=\"{}\"><span class=\"role\">{}</span>\
             <button type=\"submit\">Log out</button></form>",
            e(v.csrf),
            e(v.role)
        );
    }
    out.push_str("</header>");
    // A page that refreshes itself is no live region as a whole (a screen reader would read
    // all of it at every refresh): its script copies what changed to the status line.
    match refresh_secs {
        Some(s) => {
            let _ = write!(out, "<main id=\"main\" tabindex=\"-1\" data-refresh=\"{s}\">");
        }
        None => out.push_str("<main id=\"main\" tabindex=\"-1\">"),
    }
    out.push_str(main);
    out.push_str("</main>");
    if refresh_secs.is_some() {
        out.push_str("<p id=\"live\" class=\"sr\" role=\"status\" aria-live=\"polite\"></p>");
    }
    out.push_str("</body></html>");
    out
}

/// A line chart of one or more series over the same x positions (oldest first), drawn
/// as inline SVG with its own text alternative.
pub fn line_chart(title: &str, unit: &str, series: &[(&str, &str, Vec<f64>)]) -> String {
    const W: f64 = 560.0;
    const H: f64 = 140.0;
    const PAD: f64 = 28.0;
    let n = series.iter().map(|s| s.2.len()).max().unwrap_or(0);
    let max = series.iter().flat_map(|s| s.2.iter().copied()).fold(0.0_f64, f64::max);
    let top = if max > 0.0 { max * 1.1 } else { 1.0 };
    let mut out = String::new();
    let last: Vec<String> =
        series.iter().map(|(name, _, v)| format!("{name} {}", fmt_num(v.last().copied().unwrap_or(0.0)))).collect();
    let _ = write!(
        out,
        "<figure class=\"chart\"><figcaption>{} <span class=\"muted\">(max {} {}; now {})</span></figcaption>\
         <svg viewBox=\"0 0 {W} {H}\" role=\"img\" aria-label=\"{}\">\
         <line x1=\"{PAD}\" y1=\"{}\" x2=\"{W}\" y2=\"{}\" stroke=\"#888\" stroke-width=\"1\"/>\
         <text x=\"2\" y=\"12\" font-size=\"10\" fill=\"#333\">{}</text><text x=\"2\" y=\"{}\" font-size=\"10\" fill=\"#333\">0</text>",
        e(title),
        e(fmt_num(max)),
        e(unit),
        e(last.join(", ")),
        e(format!("{title}: max {} {unit}", fmt_num(max))),
        H - PAD / 2.0,
        H - PAD / 2.0,
        e(fmt_num(top)),
        H - PAD / 2.0,
    );
    for (name, colour, values) in series {
        if values.is_empty() {
            continue;
        }
        let step = if n > 1 { (W - PAD) / (n - 1) as f64 } else { 0.0 };
        let offset = n - values.len();
        let points: Vec<String> = values
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let x = PAD + (i + offset) as f64 * step;
                let y = (H - PAD / 2.0) - (v / top) * (H - PAD);
                format!("{x:.1},{y:.1}")
            })
            .collect();
        let _ = write!(
            out,
            "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"2\" points=\"{}\"><title>{}</title></polyline>",
            e(colour),
            points.join(" "),
            e(name)
        );
    }
    out.push_str("</svg><p class=\"legend\">");
    for (name, colour, _) in series {
        let _ = write!(
            out,
            "<span><svg width=\"12\" height=\"12\" aria-hidden=\"true\"><rect width=\"12\" height=\"12\" fill=\"{}\"/></svg> {}</span> ",
            e(colour),
            e(name)
        );
    }
    out.push_str("</p></figure>");
    out
}

/// A bar chart of labelled values (oldest first), as inline SVG; each bar's label and
/// value are its tooltip, and the figure's caption names the largest.
pub fn bar_chart(title: &str, unit: &str, bars: &[(String, f64)]) -> String {
    const W: f64 = 560.0;
    const H: f64 = 140.0;
    const PAD: f64 = 28.0;
    let max = bars.iter().map(|b| b.1).fold(0.0_f64, f64::max);
    let top = if max > 0.0 { max * 1.1 } else { 1.0 };
    let busiest = bars.iter().filter(|b| b.1 > 0.0).max_by(|a, b| a.1.total_cmp(&b.1));
    let peak = busiest.map_or("none".to_string(), |(label, v)| format!("{} {unit} at {label}", fmt_num(*v)));
    let mut out = String::new();
    let _ = write!(
        out,
        "<figure class=\"chart\"><figcaption>{} <span class=\"muted\">(highest: {})</span></figcaption>\
         <svg viewBox=\"0 0 {W} {H}\" role=\"img\" aria-label=\"{}\">\
         <line x1=\"{PAD}\" y1=\"{}\" x2=\"{W}\" y2=\"{}\" stroke=\"#888\" stroke-width=\"1\"/>\
         <text x=\"2\" y=\"12\" font-size=\"10\" fill=\"#333\">{}</text><text x=\"2\" y=\"{}\" font-size=\"10\" fill=\"#333\">0</text>",
        e(title),
        e(&peak),
        e(format!("{title}: highest {peak}")),
        H - PAD / 2.0,
        H - PAD / 2.0,
        e(fmt_num(top)),
        H - PAD / 2.0,
    );
    let slot = if bars.is_empty() { 0.0 } else { (W - PAD) / bars.len() as f64 };
    for (i, (label, v)) in bars.iter().enumerate() {
        let h = (v / top) * (H - PAD);
        let _ = write!(
            out,
            "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{h:.1}\" fill=\"#2e7d32\"><title>{}: {} {}</title></rect>",
            PAD + i as f64 * slot + slot * 0.1,
            (H - PAD / 2.0) - h,
            (slot * 0.8).max(1.0),
            e(label),
            e(fmt_num(*v)),
            e(unit)
        );
    }
    out.push_str("</svg></figure>");
    out
}

/// A number as a person reads it: whole numbers without decimals, others with up to 4
/// significant decimals.
pub fn fmt_num(x: f64) -> String {
    if !x.is_finite() {
        return "-".into();
    }
    if x == x.trunc() && x.abs() < 1e15 {
        return format!("{}", x as i64);
    }
    if x.abs() >= 100.0 { format!("{x:.1}") } else { format!("{x:.3}") }
}

/// USD with enough decimals for per-call prices.
pub fn usd(x: f64) -> String {
    if x.abs() >= 1.0 { format!("${x:.2}") } else { format!("${x:.6}") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_escaped_and_urls_encoded() {
        assert_eq!(
            e("<script>alert('x')</script> & \"y\"").to_string(),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;y&quot;"
        );
        assert_eq!(e("plain ü").to_string(), "plain ü");
        assert_eq!(q("p:T 1/&x"), "p%3AT%201%2F%26x");
        let page = page("<t>", Nav::None, None, None, "");
        assert!(page.contains("&lt;t&gt; ·") && !page.contains("<t>"));
    }

    #[test]
    fn a_bar_chart_has_a_bar_per_value() {
        let svg = bar_chart("cost", "USD", &[("10:00".into(), 0.0), ("11:00".into(), 2.5)]);
        assert_eq!(svg.matches("<rect").count(), 2);
        assert!(svg.contains("highest: 2.500 USD at 11:00"), "{svg}");
    }

    #[test]
    fn a_chart_has_a_line_per_series() {
        let svg = line_chart("in/out", "rec/s", &[("in", "#1f5fa8", vec![1.0, 2.0, 3.0]), ("out", "#b35900", vec![])]);
        assert_eq!(svg.matches("<polyline").count(), 1);
        assert!(svg.contains("aria-label=\"in/out: max 3 rec/s\""));
    }
}
