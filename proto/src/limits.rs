//! Size and count limits for everything decoded from outside a process.
//!
//! Decoders check these before and after parsing; a value over a limit is an error, never a panic
//! or an unbounded allocation.

/// Longest name (node id, service, allocation, label key). Fits a DNS label.
pub const NAME_MAX_BYTES: usize = 63;
/// Largest HTTP request body any endpoint accepts.
pub const REQUEST_BODY_MAX_BYTES: usize = 1024 * 1024;
/// Largest plan or change-feed frame an agent accepts.
pub const FRAME_MAX_BYTES: usize = 4 * 1024 * 1024;
/// Largest environment profile document.
pub const PROFILE_MAX_BYTES: usize = 1024 * 1024;
/// Most allocations in one node plan.
pub const PLAN_ALLOCATIONS_MAX: usize = 256;
/// Most events in one change-feed batch.
pub const FEED_BATCH_EVENTS_MAX: usize = 512;
/// Most arguments of one command.
pub const ARGS_MAX: usize = 64;
/// Most environment variables of one service.
pub const ENV_VARS_MAX: usize = 128;
/// Longest free-form string (command, argument, env value, message, URL).
pub const TEXT_MAX_BYTES: usize = 4096;
/// Most labels on one node.
pub const LABELS_MAX: usize = 32;
/// Most replicas of one service.
pub const REPLICAS_MAX: u32 = 1024;
/// Most architectures one service selector names.
pub const SELECTOR_ARCH_MAX: usize = 8;
/// Longest wait before a lost node's instances move (F1): seven days. Longer is `reschedule: never`.
pub const RESCHEDULE_AFTER_MAX_SECS: u32 = 7 * 24 * 3600;
/// Default wait before a lost node's instances move (F1), Kubernetes' unreachable toleration.
pub const RESCHEDULE_AFTER_DEFAULT_SECS: u32 = 300;
/// Most entries in any list of a profile (buckets, queues, classes, rules, ...).
pub const PROFILE_LIST_MAX: usize = 256;
/// Most allocation status entries in one heartbeat.
pub const HEARTBEAT_ALLOCATIONS_MAX: usize = PLAN_ALLOCATIONS_MAX;
/// Shortest and longest lease/heartbeat TTL control hands out.
pub const TTL_MIN_SECS: u32 = 3;
pub const TTL_MAX_SECS: u32 = 3600;
/// Longest long-poll wait a client may ask for, and the default.
pub const FEED_WAIT_MAX_SECS: u64 = 600;
pub const FEED_WAIT_DEFAULT_SECS: u64 = 300;
/// Control holds a long-poll for its `wait` plus up to `wait / FEED_WAIT_JITTER_DIVISOR` more,
/// so polls parked together do not all come back at once.
pub const FEED_WAIT_JITTER_DIVISOR: u32 = 16;

/// The `wait` an agent asks for so that control's answer (the wait plus its jitter) comes
/// before its next heartbeat, due in `to_beat`: at most `wanted_secs`, at least one second.
/// This keeps the feed and the heartbeat on one connection (agent/src/sync/wire.rs).
pub fn feed_wait_before_beat(wanted_secs: u64, to_beat: Option<std::time::Duration>) -> u64 {
    let Some(to_beat) = to_beat else {
        return wanted_secs;
    };
    let divisor = u128::from(FEED_WAIT_JITTER_DIVISOR);
    let fits = (to_beat.as_millis() * divisor / (divisor + 1) / 1000) as u64;
    wanted_secs.min(fits.max(1))
}
/// Most routes the edge serves at once.
pub const EDGE_ROUTES_MAX: usize = 4096;
/// Most hosts on one route.
pub const ROUTE_HOSTS_MAX: usize = 32;
/// Most backends of one route.
pub const ROUTE_BACKENDS_MAX: usize = 1024;
/// Most named ports of one service.
pub const SERVICE_PORTS_MAX: usize = 16;
