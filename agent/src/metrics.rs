//! Prometheus metrics (served on `:15014/metrics`, Istio's monitoring port).
use std::sync::{Arc, Mutex};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::TypedMetric,
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use sluice_common::Counter as BpfCounter;

use crate::dataplane::MapFill;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ZdsLabels {
    r#type: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

/// What the dataplane can report at scrape time.
pub trait DataplaneStats: Send + Sync + std::fmt::Debug + 'static {
    fn counters(&self) -> Vec<(BpfCounter, u64)>;
    fn map_fill(&self) -> Vec<MapFill>;
}

pub struct Metrics {
    registry: Mutex<Registry>,
    pub enrolled_pods: Gauge,
    pub ztunnel_connected: Gauge,
    zds_requests: Family<ZdsLabels, Counter>,
    pub enroll_duration: Histogram,
    errors: Family<KindLabels, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let enrolled_pods = Gauge::default();
        registry.register(
            "sluice_enrolled_pods",
            "Pods whose traffic is redirected to ztunnel",
            enrolled_pods.clone(),
        );
        let ztunnel_connected = Gauge::default();
        registry.register(
            "ztunnel_connected",
            "Open ZDS connections from ztunnel",
            ztunnel_connected.clone(),
        );
        let zds_requests = Family::<ZdsLabels, Counter>::default();
        registry.register(
            "sluice_zds_requests",
            "ZDS requests sent to ztunnel, by type and result",
            zds_requests.clone(),
        );
        let enroll_duration = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        registry.register(
            "sluice_enroll_duration_seconds",
            "Time to enroll a pod (dataplane and state, not waiting for ztunnel)",
            enroll_duration.clone(),
        );
        let errors = Family::<KindLabels, Counter>::default();
        registry.register("sluice_errors", "Errors by kind", errors.clone());
        Metrics {
            registry: Mutex::new(registry),
            enrolled_pods,
            ztunnel_connected,
            zds_requests,
            enroll_duration,
            errors,
        }
    }

    /// Adds the eBPF counters and map fill levels, read on each scrape.
    pub fn attach_dataplane(&self, stats: Arc<dyn DataplaneStats>) {
        self.registry
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .register_collector(Box::new(DataplaneCollector(stats)));
    }

    pub fn zds_request(&self, kind: &str, result: &str) {
        self.zds_requests
            .get_or_create(&ZdsLabels {
                r#type: kind.into(),
                result: result.into(),
            })
            .inc();
    }

    pub fn error(&self, kind: &str) {
        self.errors
            .get_or_create(&KindLabels { kind: kind.into() })
            .inc();
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}

#[derive(Debug)]
struct DataplaneCollector(Arc<dyn DataplaneStats>);

impl Collector for DataplaneCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let counters = self.0.counters();
        let (redirects, events): (Vec<_>, Vec<_>) = counters
            .iter()
            .partition(|(c, _)| c.name().ends_with("_redirected"));
        family(
            &mut encoder,
            "sluice_redirects",
            "Connections and datagrams redirected to ztunnel, by rule (from eBPF)",
            "rule",
            redirects.iter().map(|(c, v)| {
                (
                    c.name().trim_end_matches("_redirected"),
                    ConstCounter::new(*v),
                )
            }),
        )?;
        family(
            &mut encoder,
            "sluice_ebpf_events",
            "Other eBPF events: SO_ORIGINAL_DST answers, peer rewrites, drops, acceleration",
            "event",
            events
                .iter()
                .map(|(c, v)| (c.name(), ConstCounter::new(*v))),
        )?;
        let fill = self.0.map_fill();
        family(
            &mut encoder,
            "sluice_map_entries",
            "Entries in use per eBPF map",
            "map",
            fill.iter()
                .map(|m| (m.name, ConstGauge::new(m.used as i64))),
        )?;
        family(
            &mut encoder,
            "sluice_map_capacity",
            "Capacity per eBPF map",
            "map",
            fill.iter()
                .map(|m| (m.name, ConstGauge::new(m.capacity as i64))),
        )
    }
}

/// One metric family with a single label, from (label value, metric) pairs.
fn family<'a, M: EncodeMetric + TypedMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &str,
    samples: impl Iterator<Item = (&'a str, M)>,
) -> Result<(), std::fmt::Error> {
    let mut samples = samples.peekable();
    let Some((_, first)) = samples.peek() else {
        return Ok(());
    };
    let mut family = encoder.encode_descriptor(name, help, None, first.metric_type())?;
    for (value, metric) in samples {
        metric.encode(family.encode_family(&[(label, value)])?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Fake;

    impl DataplaneStats for Fake {
        fn counters(&self) -> Vec<(BpfCounter, u64)> {
            vec![
                (BpfCounter::OutboundRedirected, 3),
                (BpfCounter::OrigDstAnswered, 2),
            ]
        }
        fn map_fill(&self) -> Vec<MapFill> {
            vec![MapFill {
                name: "SL_PODS",
                used: 1,
                capacity: 8192,
            }]
        }
    }

    #[test]
    fn exposition_has_every_family() {
        let m = Metrics::new();
        m.attach_dataplane(Arc::new(Fake));
        m.zds_request("add", "ack");
        m.error("protocol");
        m.enrolled_pods.set(1);
        let text = m.encode();
        for want in [
            "sluice_enrolled_pods 1",
            "ztunnel_connected 0",
            "sluice_zds_requests_total{type=\"add\",result=\"ack\"} 1",
            "sluice_errors_total{kind=\"protocol\"} 1",
            "sluice_redirects_total{rule=\"outbound\"} 3",
            "sluice_ebpf_events_total{event=\"orig_dst_answered\"} 2",
            "sluice_map_entries{map=\"SL_PODS\"} 1",
            "sluice_enroll_duration_seconds_bucket",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
    }
}
