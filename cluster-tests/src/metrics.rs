//! A small reader for the Prometheus text format served at `/metrics`.

use std::collections::BTreeMap;

/// One sample: metric name, label pairs, value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

/// Every sample of one scrape, plus the `# TYPE` lines seen.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    pub samples: Vec<Sample>,
    pub types: Vec<(String, String)>,
}

impl Metrics {
    pub fn parse(text: &str) -> Metrics {
        let mut metrics = Metrics::default();
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut parts = rest.split_whitespace();
                if let (Some(name), Some(kind)) = (parts.next(), parts.next()) {
                    metrics.types.push((name.to_owned(), kind.to_owned()));
                }
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            if let Some(sample) = parse_sample(line) {
                metrics.samples.push(sample);
            }
        }
        metrics
    }

    /// Whether the scrape mentions this metric (a sample or a `# TYPE`).
    pub fn has(&self, name: &str) -> bool {
        self.samples.iter().any(|s| s.name == name) || self.types.iter().any(|(n, _)| n == name)
    }

    /// The sum of all samples of `name` over every label set (0 if absent).
    pub fn sum(&self, name: &str) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .map(|s| s.value)
            .sum()
    }

    /// The sum of the samples of `name` whose label `label` is `value`.
    pub fn labeled(&self, name: &str, label: &str, value: &str) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| s.labels.iter().any(|(k, v)| k == label && v == value))
            .map(|s| s.value)
            .sum()
    }
}

/// One peer's `herald_peer_*{peer="..."}` samples in one scrape (a
/// counter absent from the scrape reads 0).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct PeerMetrics {
    /// `herald_peer_connected`: 1 while the QUIC connection is up.
    pub connected: f64,
    /// `herald_peer_rtt_seconds`, served only while connected.
    pub rtt_seconds: Option<f64>,
    pub sent_bytes: f64,
    pub sent_frames: f64,
    pub received_bytes: f64,
    pub received_frames: f64,
    pub reconnects: f64,
}

impl Metrics {
    /// The value of the sample of `name` whose label `label` is `value`,
    /// if the scrape has one.
    pub fn sample(&self, name: &str, label: &str, value: &str) -> Option<f64> {
        self.samples
            .iter()
            .find(|s| s.name == name && s.labels.iter().any(|(k, v)| k == label && v == value))
            .map(|s| s.value)
    }

    /// The per-peer families, by peer id (every peer named by a
    /// `herald_peer_*` sample).
    pub fn peers(&self) -> BTreeMap<String, PeerMetrics> {
        let ids: Vec<&str> = self
            .samples
            .iter()
            .filter(|s| s.name.starts_with("herald_peer_"))
            .flat_map(|s| s.labels.iter())
            .filter(|(k, _)| k == "peer")
            .map(|(_, v)| v.as_str())
            .collect();
        ids.into_iter()
            .map(|id| {
                let counter = |name: &str| self.sample(name, "peer", id).unwrap_or(0.0);
                let peer = PeerMetrics {
                    connected: counter("herald_peer_connected"),
                    rtt_seconds: self.sample("herald_peer_rtt_seconds", "peer", id),
                    sent_bytes: counter("herald_peer_sent_bytes_total"),
                    sent_frames: counter("herald_peer_sent_frames_total"),
                    received_bytes: counter("herald_peer_received_bytes_total"),
                    received_frames: counter("herald_peer_received_frames_total"),
                    reconnects: counter("herald_peer_reconnects_total"),
                };
                (id.to_owned(), peer)
            })
            .collect()
    }
}

fn parse_sample(line: &str) -> Option<Sample> {
    let (name, labels, rest) = match line.find('{') {
        Some(open) if line[..open].find(' ').is_none() => {
            let close = line.rfind('}')?;
            (
                &line[..open],
                parse_labels(&line[open + 1..close]),
                &line[close + 1..],
            )
        }
        _ => {
            let space = line.find(' ')?;
            (&line[..space], Vec::new(), &line[space..])
        }
    };
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

fn parse_labels(text: &str) -> Vec<(String, String)> {
    let mut labels = Vec::new();
    let mut rest = text;
    while let Some(eq) = rest.find('=') {
        let key = rest[..eq].trim().trim_start_matches(',').trim().to_owned();
        let after = &rest[eq + 1..];
        let Some(after) = after.strip_prefix('"') else {
            break;
        };
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, e)) = chars.next() {
                        value.push(if e == 'n' { '\n' } else { e });
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        labels.push((key, value));
        rest = &after[end..];
    }
    labels
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_samples_with_and_without_labels() {
        let m = Metrics::parse(
            "# TYPE herald_connections gauge\nherald_connections 3\n\
             herald_disconnects_total{code=\"4001\"} 2\nherald_disconnects_total{code=\"1000\",x=\"a b\"} 5 1700000000\n",
        );
        assert_eq!(m.sum("herald_connections"), 3.0);
        assert_eq!(m.sum("herald_disconnects_total"), 7.0);
        assert_eq!(m.labeled("herald_disconnects_total", "code", "4001"), 2.0);
        assert_eq!(m.labeled("herald_disconnects_total", "x", "a b"), 5.0);
        assert!(m.has("herald_connections"));
        assert!(!m.has("herald_topics"));
    }

    #[test]
    fn reads_the_per_peer_families() {
        let m = Metrics::parse(
            "herald_connections 3\n\
             herald_peer_connected{peer=\"n2\"} 1\nherald_peer_connected{peer=\"n3\"} 0\n\
             herald_peer_rtt_seconds{peer=\"n2\"} 0.00025\n\
             herald_peer_sent_bytes_total{peer=\"n2\"} 40\nherald_peer_sent_frames_total{peer=\"n2\"} 3\n\
             herald_peer_received_bytes_total{peer=\"n3\"} 30\nherald_peer_reconnects_total{peer=\"n3\"} 2\n",
        );
        let peers = m.peers();
        assert_eq!(peers.keys().collect::<Vec<_>>(), ["n2", "n3"]);
        let n2 = peers["n2"];
        assert_eq!((n2.connected, n2.rtt_seconds), (1.0, Some(0.00025)));
        assert_eq!(
            (n2.sent_bytes, n2.sent_frames, n2.reconnects),
            (40.0, 3.0, 0.0)
        );
        let n3 = peers["n3"];
        assert_eq!((n3.connected, n3.rtt_seconds), (0.0, None));
        assert_eq!((n3.received_bytes, n3.reconnects), (30.0, 2.0));
    }
}
