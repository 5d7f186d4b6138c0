//! Control's Prometheus metrics (M1): one registry per process, rendered in the text exposition
//! format on `--metrics-listen ADDR` (plain HTTP, `GET /metrics`). Counters and histograms are
//! updated where the work happens (group commit, feed, projector); gauges that describe state
//! (nodes by state, feed waiters, projection lag in events) are read from the views at scrape.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::app::Control;
use crate::projection::NodeState;
use crate::rollout::RolloutState;

/// The content type of the text exposition format prometheus-client writes (OpenMetrics).
pub const TEXT_FORMAT: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

type Labels = Vec<(&'static str, &'static str)>;

/// Wall-clock milliseconds, to compare with events' commit times (`at_unix_ms`).
pub fn unix_ms_now() -> u64 {
    use crate::app::Clock;
    crate::app::SystemClock.now_unix_ms()
}

/// Latency buckets in seconds, 1 ms to ~33 s.
fn latency_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.001, 2.0, 16)
}

/// Histograms observed outside the core (the feed's fan-out, the projector's lag); the core
/// registers clones, which share the same values.
#[derive(Clone)]
pub struct LatencyHistogram(pub Histogram);

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self(Histogram::new(latency_buckets()))
    }
}

impl LatencyHistogram {
    pub fn observe_ms(&self, millis: u64) {
        self.0.observe(millis as f64 / 1000.0);
    }
}

/// Every metric of a control process.
pub struct ControlMetrics {
    registry: Registry,
    /// Commands group-committed (each one all or nothing) and events appended.
    pub commands: Counter,
    pub events_appended: Counter,
    pub batches: Counter,
    pub batch_failures: Counter,
    /// Commands per group-commit batch.
    pub batch_commands: Histogram,
    /// Seconds per `commit_batch`: one store transaction and its fsync.
    pub commit_seconds: Histogram,
    nodes: Family<Labels, Gauge>,
    rollouts: Family<Labels, Gauge>,
    feed_waiters: Gauge,
    log_head: Gauge,
    projection_lag_events: Gauge,
    staged_commands: Gauge,
}

impl ControlMetrics {
    /// Registers every metric; `fanout` and `projection_lag` are the feed's and the projector's.
    pub fn new(fanout: &LatencyHistogram, projection_lag: &LatencyHistogram) -> Self {
        let mut registry = Registry::with_prefix("outpost_control");
        let metrics = Self {
            commands: Counter::default(),
            events_appended: Counter::default(),
            batches: Counter::default(),
            batch_failures: Counter::default(),
            batch_commands: Histogram::new(exponential_buckets(1.0, 2.0, 13)),
            commit_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            nodes: Family::default(),
            rollouts: Family::default(),
            feed_waiters: Gauge::default(),
            log_head: Gauge::default(),
            projection_lag_events: Gauge::default(),
            staged_commands: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "commands",
            "Commands group-committed (durable)",
            metrics.commands.clone(),
        );
        registry.register(
            "events_appended",
            "Events appended to the log",
            metrics.events_appended.clone(),
        );
        registry.register(
            "commit_batches",
            "Group-commit batches written (one transaction each)",
            metrics.batches.clone(),
        );
        registry.register(
            "commit_batch_failures",
            "Group-commit batches the store refused or failed",
            metrics.batch_failures.clone(),
        );
        registry.register(
            "commit_batch_commands",
            "Commands per group-commit batch",
            metrics.batch_commands.clone(),
        );
        registry.register(
            "commit_fsync_seconds",
            "Seconds per group-commit store transaction, its fsync included",
            metrics.commit_seconds.clone(),
        );
        registry.register(
            "nodes",
            "Nodes by state (ready, down, revoked)",
            metrics.nodes.clone(),
        );
        registry.register(
            "rollouts",
            "Services' latest rollouts by state (progressing, completed, halted, rolled_back)",
            metrics.rollouts.clone(),
        );
        registry.register(
            "feed_waiters",
            "Nodes with a change-feed long-poll waiting",
            metrics.feed_waiters.clone(),
        );
        registry.register(
            "log_head",
            "Last event id in the log",
            metrics.log_head.clone(),
        );
        registry.register(
            "projection_lag_events",
            "Events in the log not yet applied to the views",
            metrics.projection_lag_events.clone(),
        );
        registry.register(
            "staged_commands",
            "Commands staged for group commit and not yet answered",
            metrics.staged_commands.clone(),
        );
        registry.register(
            "feed_fanout_seconds",
            "Seconds from an event's commit to the long-poll answer that carries it to a waiting node",
            fanout.0.clone(),
        );
        registry.register(
            "projection_lag_seconds",
            "Seconds from an event's commit to its application to the views",
            projection_lag.0.clone(),
        );
        Self {
            registry,
            ..metrics
        }
    }

    /// Reads the state gauges from the control and renders every metric.
    pub fn render(&self, control: &Control) -> String {
        let head = control.hub.position().head;
        let checkpoint = control.projector.checkpoint();
        let (mut ready, mut down, mut revoked) = (0i64, 0i64, 0i64);
        for node in control.projector.views().nodes.values() {
            match node.state {
                NodeState::Ready => ready += 1,
                NodeState::Down => down += 1,
                NodeState::Revoked => revoked += 1,
            }
        }
        for (state, count) in [("ready", ready), ("down", down), ("revoked", revoked)] {
            self.nodes.get_or_create(&vec![("state", state)]).set(count);
        }
        let mut rollouts = [0i64; 4];
        for rollout in control.projector.views().rollouts.services.values() {
            rollouts[match rollout.state {
                RolloutState::Progressing => 0,
                RolloutState::Completed => 1,
                RolloutState::Halted => 2,
                RolloutState::RolledBack => 3,
            }] += 1;
        }
        for (state, count) in [
            RolloutState::Progressing,
            RolloutState::Completed,
            RolloutState::Halted,
            RolloutState::RolledBack,
        ]
        .iter()
        .zip(rollouts)
        {
            self.rollouts
                .get_or_create(&vec![("state", state.as_str())])
                .set(count);
        }
        self.feed_waiters
            .set(control.hub.waiters.waiting_keys() as i64);
        self.log_head.set(head as i64);
        self.projection_lag_events
            .set(head.saturating_sub(checkpoint) as i64);
        self.staged_commands
            .set(control.committer.outstanding() as i64);
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut text, &self.registry);
        text
    }
}

/// The metrics listener's router: `GET /metrics`, nothing else.
pub fn router(control: Arc<Control>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .fallback(|| async { (StatusCode::NOT_FOUND, "only /metrics is served here\n") })
        .with_state(control)
}

async fn metrics_handler(State(control): State<Arc<Control>>) -> Response {
    let text = control.metrics.render(&control);
    ([(header::CONTENT_TYPE, TEXT_FORMAT)], text).into_response()
}

/// Binds `listen` and serves `/metrics` over plain HTTP until the process ends. Binding happens
/// before this returns, so a bad address fails the start.
pub async fn serve_metrics(
    control: Arc<Control>,
    listen: SocketAddr,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, router(control)).await {
            tracing::warn!(
                component = "metrics",
                action = "serve",
                "metrics listener failed: {error}"
            );
        }
    });
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_render_in_the_text_format() {
        let fanout = LatencyHistogram::default();
        let lag = LatencyHistogram::default();
        let metrics = ControlMetrics::new(&fanout, &lag);
        fanout.observe_ms(12);
        metrics.commands.inc_by(3);
        metrics.batch_commands.observe(3.0);
        let mut text = String::new();
        encode(&mut text, &metrics.registry).unwrap();
        assert!(text.contains("outpost_control_commands_total 3"), "{text}");
        assert!(
            text.contains("outpost_control_feed_fanout_seconds_count 1"),
            "{text}"
        );
        assert!(
            text.contains("outpost_control_commit_batch_commands_bucket{le=\"4.0\"} 1"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
