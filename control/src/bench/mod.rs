//! Benchmarks that print figures (docs/performance.md), never tests: `bench-fleet` starts a
//! release control as its own process and simulates a fleet of agents against it over TLS on
//! loopback ([`fleet`]); it also measures durable commands per second with `wrk` against
//! control and against etcd in the same run ([`throughput`]).

pub mod fleet;
pub mod http;
pub mod process;
pub mod throughput;

/// What can stop a benchmark.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("cannot start {program}: {reason}")]
    Spawn { program: String, reason: String },
    #[error("{what} did not happen within {secs} s")]
    Timeout { what: String, secs: u64 },
    #[error("{what}: {reason}")]
    Io { what: String, reason: String },
    #[error("http call {what} failed: {reason}")]
    Http { what: String, reason: String },
    #[error("{what} answered {status}: {body}")]
    Status {
        what: String,
        status: u16,
        body: String,
    },
    #[error("cannot read {what}: {reason}")]
    Parse { what: String, reason: String },
}

impl BenchError {
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BenchError {
        let what = what.into();
        move |error| BenchError::Io {
            what,
            reason: error.to_string(),
        }
    }
}

/// Percentiles of a set of durations, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Percentiles {
    pub count: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// Nearest-rank percentiles of `samples_ms` (empty gives zeros).
pub fn percentiles(samples_ms: &[f64]) -> Percentiles {
    if samples_ms.is_empty() {
        return Percentiles::default();
    }
    let mut sorted = samples_ms.to_vec();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let rank = |p: f64| {
        let index = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
        sorted[index]
    };
    Percentiles {
        count: sorted.len(),
        p50_ms: rank(0.50),
        p99_ms: rank(0.99),
        max_ms: sorted[sorted.len() - 1],
    }
}

impl std::fmt::Display for Percentiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} samples)",
            self.p50_ms, self.p99_ms, self.max_ms, self.count
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let samples: Vec<f64> = (1..=100).map(f64::from).collect();
        let p = percentiles(&samples);
        assert_eq!(
            (p.count, p.p50_ms, p.p99_ms, p.max_ms),
            (100, 50.0, 99.0, 100.0)
        );
        assert_eq!(percentiles(&[]).count, 0);
        assert_eq!(percentiles(&[7.0]).p99_ms, 7.0);
    }
}
