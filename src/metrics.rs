//! Durations and counters the daemon keeps: recent samples for the control socket's `stats`
//! request and the benchmark, and cumulative histograms for Prometheus.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;

use crate::pool::PoolStatus;
use crate::slot::SlotState;

/// Samples kept per series: enough for stable percentiles, bounded for a daemon that runs for
/// months.
const MAX_SAMPLES: usize = 4096;
/// Histogram bucket bounds in seconds: from a fast assignment (tens of milliseconds) to a
/// long CI job (hours).
const BUCKETS_SECS: [f64; 16] = [
    0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 7200.0,
    21600.0,
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Series {
    /// Building a clean snapshot: boot, wait for `ready`, save.
    Build,
    /// From the end of a job to the slot being ready again.
    Revert,
    /// From a job's arrival to the guest's `started`.
    Assign,
    /// From a job's arrival to its assignment to a slot.
    QueueWait,
    /// From a job's assignment to a slot to its end.
    Job,
    /// From a GitHub `queued` webhook to the guest's `started`, which the guest sends once it
    /// has the job message with the runner's configuration.
    WebhookToStart,
}

impl Series {
    const ALL: [Series; 6] = [
        Series::Build,
        Series::Revert,
        Series::Assign,
        Series::QueueWait,
        Series::Job,
        Series::WebhookToStart,
    ];

    fn metric(self) -> (&'static str, &'static str) {
        match self {
            Series::Build => ("warmpool_build_seconds", "Time to build a clean snapshot."),
            Series::Revert => {
                ("warmpool_revert_seconds", "Time from a job's end to its slot being ready again.")
            }
            Series::Assign => {
                ("warmpool_assign_seconds", "Time from a job's arrival to the guest's started.")
            }
            Series::QueueWait => {
                ("warmpool_queue_wait_seconds", "Time a job waited for a ready slot.")
            }
            Series::Job => ("warmpool_job_seconds", "Time from a job's assignment to its end."),
            Series::WebhookToStart => (
                "warmpool_github_webhook_to_start_seconds",
                "Time from a GitHub queued webhook to the guest starting its runner.",
            ),
        }
    }
}

#[derive(Debug, Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    samples: BTreeMap<Series, VecDeque<u64>>,
    histograms: BTreeMap<Series, Histogram>,
    jobs_ok: u64,
    jobs_failed: u64,
    /// Jobs ended, by tenant id and result.
    tenant_jobs: BTreeMap<(String, &'static str), u64>,
}

#[derive(Debug, Default, Clone)]
struct Histogram {
    /// Observations at or below each bound of [`BUCKETS_SECS`], not cumulative.
    counts: [u64; BUCKETS_SECS.len()],
    count: u64,
    sum_secs: f64,
}

/// What the `stats` request returns.
#[derive(Debug, Clone, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct Snapshot {
    pub build_ms: Vec<u64>,
    pub revert_ms: Vec<u64>,
    pub assign_ms: Vec<u64>,
    /// From a GitHub `queued` webhook to the guest's `started`.
    #[serde(default)]
    pub webhook_to_start_ms: Vec<u64>,
    /// Jobs whose guest reported `finished`, whatever their exit code.
    pub jobs_ok: u64,
    /// Jobs that ended any other way: timeout, guest failure, protocol error, cancellation.
    pub jobs_failed: u64,
}

impl Metrics {
    pub fn record(&self, series: Series, duration: Duration) {
        let mut inner = self.inner.lock().expect("metrics lock");
        let samples = inner.samples.entry(series).or_default();
        if samples.len() == MAX_SAMPLES {
            samples.pop_front();
        }
        samples.push_back(duration.as_millis() as u64);

        let histogram = inner.histograms.entry(series).or_default();
        let secs = duration.as_secs_f64();
        if let Some(bucket) = BUCKETS_SECS.iter().position(|bound| secs <= *bound) {
            histogram.counts[bucket] += 1;
        }
        histogram.count += 1;
        histogram.sum_secs += secs;
    }

    pub fn count_job(&self, ok: bool) {
        let mut inner = self.inner.lock().expect("metrics lock");
        if ok {
            inner.jobs_ok += 1;
        } else {
            inner.jobs_failed += 1;
        }
    }

    /// Counts a job of `tenant` that ended: `finished` when its guest reported so, else `failed`.
    pub fn count_tenant_job(&self, tenant: &str, finished: bool) {
        let result = if finished { "finished" } else { "failed" };
        let mut inner = self.inner.lock().expect("metrics lock");
        *inner.tenant_jobs.entry((tenant.to_owned(), result)).or_default() += 1;
    }

    pub fn snapshot(&self) -> Snapshot {
        let inner = self.inner.lock().expect("metrics lock");
        let samples = |series| {
            inner.samples.get(&series).map(|s| s.iter().copied().collect()).unwrap_or_default()
        };
        Snapshot {
            build_ms: samples(Series::Build),
            revert_ms: samples(Series::Revert),
            assign_ms: samples(Series::Assign),
            webhook_to_start_ms: samples(Series::WebhookToStart),
            jobs_ok: inner.jobs_ok,
            jobs_failed: inner.jobs_failed,
        }
    }

    /// The Prometheus text exposition of the counters, the histograms and the slots of `pools`.
    pub fn render_prometheus(&self, pools: &[PoolStatus]) -> String {
        let mut out = String::new();
        out.push_str(
            "# HELP warmpool_slots Slots by pool and state.\n# TYPE warmpool_slots gauge\n",
        );
        for pool in pools {
            for state in SlotState::ALL {
                let _ = writeln!(
                    out,
                    "warmpool_slots{{pool=\"{}\",state=\"{state}\"}} {}",
                    pool.name,
                    pool.count(state)
                );
            }
        }
        out.push_str("# HELP warmpool_jobs_queued Jobs waiting for a slot.\n# TYPE warmpool_jobs_queued gauge\n");
        for pool in pools {
            let _ = writeln!(out, "warmpool_jobs_queued{{pool=\"{}\"}} {}", pool.name, pool.queued);
        }

        let inner = self.inner.lock().expect("metrics lock");
        out.push_str("# HELP warmpool_jobs_total Jobs ended, by result.\n# TYPE warmpool_jobs_total counter\n");
        let _ = writeln!(out, "warmpool_jobs_total{{result=\"finished\"}} {}", inner.jobs_ok);
        let _ = writeln!(out, "warmpool_jobs_total{{result=\"failed\"}} {}", inner.jobs_failed);
        out.push_str("# HELP warmpool_tenant_jobs_total Jobs ended, by tenant and result.\n");
        out.push_str("# TYPE warmpool_tenant_jobs_total counter\n");
        for ((tenant, result), count) in &inner.tenant_jobs {
            let _ = writeln!(
                out,
                "warmpool_tenant_jobs_total{{tenant=\"{tenant}\",result=\"{result}\"}} {count}"
            );
        }
        for series in Series::ALL {
            let histogram = inner.histograms.get(&series).cloned().unwrap_or_default();
            render_histogram(&mut out, series, &histogram);
        }
        out
    }
}

fn render_histogram(out: &mut String, series: Series, histogram: &Histogram) {
    let (name, help) = series.metric();
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
    let mut cumulative = 0;
    for (bound, count) in BUCKETS_SECS.iter().zip(histogram.counts) {
        cumulative += count;
        let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
    }
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", histogram.count);
    let _ = writeln!(out, "{name}_sum {}", histogram.sum_secs);
    let _ = writeln!(out, "{name}_count {}", histogram.count);
}

/// The `p`th percentile (0 to 100) of `samples` by the nearest-rank method, or 0 for none.
pub fn percentile(samples: &[u64], p: u32) -> u64 {
    if samples.is_empty() {
        return 0;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    let rank = (u64::from(p) * sorted.len() as u64).div_ceil(100).max(1) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::SlotStatus;

    #[test]
    fn percentiles_by_nearest_rank() {
        let samples: Vec<u64> = (1..=20).collect();
        assert_eq!(percentile(&samples, 50), 10);
        assert_eq!(percentile(&samples, 95), 19);
        assert_eq!(percentile(&samples, 100), 20);
        assert_eq!(percentile(&[7], 50), 7);
        assert_eq!(percentile(&[], 50), 0);
    }

    #[test]
    fn series_keep_only_the_newest_samples() {
        let metrics = Metrics::default();
        for ms in 0..(MAX_SAMPLES as u64 + 10) {
            metrics.record(Series::Revert, Duration::from_millis(ms));
        }
        let snapshot = metrics.snapshot();
        assert_eq!(snapshot.revert_ms.len(), MAX_SAMPLES);
        assert_eq!(snapshot.revert_ms[0], 10);
    }

    #[test]
    fn prometheus_text_has_slots_counters_and_cumulative_buckets() {
        let metrics = Metrics::default();
        metrics.record(Series::Assign, Duration::from_millis(80));
        metrics.record(Series::Assign, Duration::from_millis(400));
        metrics.record(Series::Assign, Duration::from_secs(100_000));
        metrics.count_job(true);
        metrics.count_job(false);
        metrics.count_tenant_job("t1", true);
        metrics.count_tenant_job("t1", true);
        let slot = |state| SlotStatus { name: "s".into(), state, job: None, error: None };
        let pools = [PoolStatus {
            name: "p".into(),
            labels: vec![],
            queued: 3,
            slots: vec![slot(SlotState::Ready), slot(SlotState::Ready), slot(SlotState::Running)],
            refused: None,
        }];
        let text = metrics.render_prometheus(&pools);
        for line in [
            "warmpool_slots{pool=\"p\",state=\"ready\"} 2",
            "warmpool_slots{pool=\"p\",state=\"quarantined\"} 0",
            "warmpool_jobs_queued{pool=\"p\"} 3",
            "warmpool_jobs_total{result=\"failed\"} 1",
            "warmpool_tenant_jobs_total{tenant=\"t1\",result=\"finished\"} 2",
            "warmpool_assign_seconds_bucket{le=\"0.05\"} 0",
            "warmpool_assign_seconds_bucket{le=\"0.1\"} 1",
            "warmpool_assign_seconds_bucket{le=\"0.5\"} 2",
            "warmpool_assign_seconds_bucket{le=\"21600\"} 2",
            "warmpool_assign_seconds_bucket{le=\"+Inf\"} 3",
            "warmpool_assign_seconds_count 3",
            "warmpool_revert_seconds_count 0",
        ] {
            assert!(text.lines().any(|l| l == line), "missing `{line}` in:\n{text}");
        }
        // Every sample line is `name{labels} value` or `name value`, with a numeric value.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let value = line.rsplit(' ').next().unwrap();
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
    }
}
