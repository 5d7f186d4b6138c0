//! Default EventBus adapter: in-process pub/sub with exchanges, queues, bindings and AMQP-style
//! routing (direct, fanout, topic with `*` and `#`), message TTL and dead-lettering (C3, C5).
//!
//! State lives in the agent process and is shared by clones of the handle. Headers exchanges
//! route nothing: messages here carry no headers to match.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use outpost_proto::profile::{BindingSpec, ExchangeKind, ExchangeSpec, QueueSpec};

use super::ports::{
    AdapterIdentity, AdapterKind, BindingCheck, BusMessage, DeclareCheck, EventBus, IdempotencyKey,
    PortError,
};

/// Most messages one in-process queue holds; the oldest are dropped beyond it.
pub const QUEUE_MESSAGES_MAX: usize = 10_000;

#[derive(Debug)]
struct QueuedMessage {
    message: BusMessage,
    enqueued_at: Instant,
}

#[derive(Debug)]
struct QueueEntry {
    spec: QueueSpec,
    messages: VecDeque<QueuedMessage>,
}

#[derive(Debug, Default)]
struct BusState {
    exchanges: BTreeMap<String, ExchangeKind>,
    queues: BTreeMap<String, QueueEntry>,
    /// (exchange, queue, routing key)
    bindings: BTreeSet<(String, String, String)>,
}

/// A handle on one in-process bus; clones share it.
#[derive(Debug, Clone, Default)]
pub struct InProcessBus {
    state: Arc<Mutex<BusState>>,
}

impl InProcessBus {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, BusState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Removes a binding, as an operator would by hand (the engine never unbinds); true when it
    /// existed.
    #[cfg(test)]
    pub fn unbind(&self, binding: &BindingSpec) -> bool {
        self.lock().bindings.remove(&(
            binding.exchange.to_string(),
            binding.queue.to_string(),
            binding.routing_key.clone(),
        ))
    }

    /// Messages waiting in a queue (after expiring those past their TTL).
    pub fn depth(&self, queue: &str) -> usize {
        let mut state = self.lock();
        expire(&mut state, queue, Instant::now());
        state
            .queues
            .get(queue)
            .map_or(0, |entry| entry.messages.len())
    }
}

/// AMQP topic matching: words split on `.`, `*` is exactly one word, `#` zero or more.
pub fn topic_matches(pattern: &str, routing_key: &str) -> bool {
    let pattern: Vec<&str> = pattern.split('.').collect();
    let key: Vec<&str> = if routing_key.is_empty() {
        Vec::new()
    } else {
        routing_key.split('.').collect()
    };
    fn go(pattern: &[&str], key: &[&str]) -> bool {
        match pattern.split_first() {
            None => key.is_empty(),
            Some((&"#", rest)) => (0..=key.len()).any(|skip| go(rest, &key[skip..])),
            Some((&"*", rest)) => !key.is_empty() && go(rest, &key[1..]),
            Some((word, rest)) => key.first() == Some(word) && go(rest, &key[1..]),
        }
    }
    go(&pattern, &key)
}

fn routes(kind: ExchangeKind, binding_key: &str, routing_key: &str) -> bool {
    match kind {
        ExchangeKind::Direct => binding_key == routing_key,
        ExchangeKind::Fanout => true,
        ExchangeKind::Topic => topic_matches(binding_key, routing_key),
        ExchangeKind::Headers => false,
    }
}

fn deliver(
    state: &mut BusState,
    exchange: &str,
    message: BusMessage,
    now: Instant,
    hops: u8,
) -> Result<(), PortError> {
    if exchange.is_empty() {
        if let Some(entry) = state.queues.get_mut(&message.routing_key) {
            push(entry, message, now);
        }
        return Ok(());
    }
    let Some(kind) = state.exchanges.get(exchange).copied() else {
        return Err(PortError::refused(
            "publish",
            exchange,
            "no such exchange (404 NOT_FOUND)",
        ));
    };
    let targets: BTreeSet<String> = state
        .bindings
        .iter()
        .filter(|(bound_exchange, _, key)| {
            bound_exchange == exchange && routes(kind, key, &message.routing_key)
        })
        .map(|(_, queue, _)| queue.clone())
        .collect();
    for queue in targets {
        expire_with_hops(state, &queue, now, hops);
        if let Some(entry) = state.queues.get_mut(&queue) {
            push(entry, message.clone(), now);
        }
    }
    Ok(())
}

fn push(entry: &mut QueueEntry, message: BusMessage, now: Instant) {
    if entry.messages.len() >= QUEUE_MESSAGES_MAX {
        entry.messages.pop_front();
    }
    entry.messages.push_back(QueuedMessage {
        message,
        enqueued_at: now,
    });
}

fn expire(state: &mut BusState, queue: &str, now: Instant) {
    expire_with_hops(state, queue, now, 0);
}

/// Moves messages past the queue's TTL to its dead-letter exchange (or drops them). `hops` bounds
/// dead-letter cycles.
fn expire_with_hops(state: &mut BusState, queue: &str, now: Instant, hops: u8) {
    let Some(entry) = state.queues.get_mut(queue) else {
        return;
    };
    let Some(ttl_ms) = entry.spec.message_ttl_ms else {
        return;
    };
    let ttl = Duration::from_millis(ttl_ms);
    let mut dead = Vec::new();
    while entry
        .messages
        .front()
        .is_some_and(|queued| now.duration_since(queued.enqueued_at) >= ttl)
    {
        if let Some(queued) = entry.messages.pop_front() {
            dead.push(queued.message);
        }
    }
    let dead_letter_exchange = entry
        .spec
        .dead_letter_exchange
        .as_ref()
        .map(|name| name.to_string());
    if let (Some(exchange), true) = (dead_letter_exchange, hops < 8) {
        for message in dead {
            let _ = deliver(state, &exchange, message, now, hops + 1);
        }
    }
}

fn queue_shape(spec: &QueueSpec) -> String {
    format!(
        "x-message-ttl={:?} x-dead-letter-exchange={:?}",
        spec.message_ttl_ms, spec.dead_letter_exchange
    )
}

impl EventBus for InProcessBus {
    fn identity(&self) -> AdapterIdentity {
        AdapterIdentity {
            kind: AdapterKind::InProcess,
            location: "in-process".into(),
        }
    }

    fn check_exchange(&mut self, exchange: &ExchangeSpec) -> Result<DeclareCheck, PortError> {
        Ok(match self.lock().exchanges.get(exchange.name.as_str()) {
            None => DeclareCheck::Missing,
            Some(kind) if *kind == exchange.kind => DeclareCheck::Matches,
            Some(kind) => DeclareCheck::Differs(format!("type {kind:?}")),
        })
    }

    fn check_queue(&mut self, queue: &QueueSpec) -> Result<DeclareCheck, PortError> {
        Ok(match self.lock().queues.get(queue.name.as_str()) {
            None => DeclareCheck::Missing,
            Some(entry) if entry.spec == *queue => DeclareCheck::Matches,
            Some(entry) => DeclareCheck::Differs(queue_shape(&entry.spec)),
        })
    }

    fn check_binding(&mut self, binding: &BindingSpec) -> Result<BindingCheck, PortError> {
        let key = (
            binding.exchange.to_string(),
            binding.queue.to_string(),
            binding.routing_key.clone(),
        );
        Ok(if self.lock().bindings.contains(&key) {
            BindingCheck::Present
        } else {
            BindingCheck::Missing
        })
    }

    fn declare_exchange(
        &mut self,
        exchange: &ExchangeSpec,
        _key: &IdempotencyKey,
    ) -> Result<(), PortError> {
        let mut state = self.lock();
        match state.exchanges.get(exchange.name.as_str()) {
            Some(kind) if *kind != exchange.kind => Err(PortError::refused(
                "declare exchange",
                exchange.name.as_str(),
                format!(
                    "PRECONDITION_FAILED - inequivalent arg 'type': found {kind:?}, wanted {:?}",
                    exchange.kind
                ),
            )),
            _ => {
                state
                    .exchanges
                    .insert(exchange.name.to_string(), exchange.kind);
                Ok(())
            }
        }
    }

    fn declare_queue(&mut self, queue: &QueueSpec, _key: &IdempotencyKey) -> Result<(), PortError> {
        let mut state = self.lock();
        match state.queues.get(queue.name.as_str()) {
            Some(entry) if entry.spec != *queue => Err(PortError::refused(
                "declare queue",
                queue.name.as_str(),
                format!(
                    "PRECONDITION_FAILED - inequivalent arguments: found {}",
                    queue_shape(&entry.spec)
                ),
            )),
            Some(_) => Ok(()),
            None => {
                state.queues.insert(
                    queue.name.to_string(),
                    QueueEntry {
                        spec: queue.clone(),
                        messages: VecDeque::new(),
                    },
                );
                Ok(())
            }
        }
    }

    fn bind(&mut self, binding: &BindingSpec, _key: &IdempotencyKey) -> Result<(), PortError> {
        let mut state = self.lock();
        let target = format!("{}->{}", binding.exchange, binding.queue);
        if !state.exchanges.contains_key(binding.exchange.as_str()) {
            return Err(PortError::refused(
                "bind queue",
                target,
                "no such exchange (404 NOT_FOUND)",
            ));
        }
        if !state.queues.contains_key(binding.queue.as_str()) {
            return Err(PortError::refused(
                "bind queue",
                target,
                "no such queue (404 NOT_FOUND)",
            ));
        }
        state.bindings.insert((
            binding.exchange.to_string(),
            binding.queue.to_string(),
            binding.routing_key.clone(),
        ));
        Ok(())
    }

    fn publish(
        &mut self,
        exchange: &str,
        routing_key: &str,
        payload: &[u8],
        key: &IdempotencyKey,
    ) -> Result<(), PortError> {
        let message = BusMessage {
            routing_key: routing_key.to_string(),
            payload: payload.to_vec(),
            idempotency_key: Some(key.as_str().to_string()),
        };
        deliver(&mut self.lock(), exchange, message, Instant::now(), 0)
    }

    fn get(&mut self, queue: &str) -> Result<Option<BusMessage>, PortError> {
        let mut state = self.lock();
        expire(&mut state, queue, Instant::now());
        match state.queues.get_mut(queue) {
            None => Err(PortError::refused(
                "get",
                queue,
                "no such queue (404 NOT_FOUND)",
            )),
            Some(entry) => Ok(entry.messages.pop_front().map(|queued| queued.message)),
        }
    }

    fn delete_exchange(&mut self, exchange: &str, _key: &IdempotencyKey) -> Result<(), PortError> {
        let mut state = self.lock();
        state.exchanges.remove(exchange);
        state.bindings.retain(|(bound, _, _)| bound != exchange);
        Ok(())
    }

    fn delete_queue(&mut self, queue: &str, _key: &IdempotencyKey) -> Result<(), PortError> {
        let mut state = self.lock();
        state.queues.remove(queue);
        state.bindings.retain(|(_, bound, _)| bound != queue);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_patterns_follow_amqp() {
        assert!(topic_matches("sensor.#", "sensor"));
        assert!(topic_matches("sensor.#", "sensor.a.b"));
        assert!(topic_matches("sensor.*", "sensor.a"));
        assert!(!topic_matches("sensor.*", "sensor.a.b"));
        assert!(!topic_matches("sensor.*", "sensor"));
        assert!(topic_matches("#", ""));
        assert!(topic_matches("#", "a.b"));
        assert!(topic_matches("*.b.#", "a.b"));
        assert!(topic_matches("a.#.z", "a.z"));
        assert!(topic_matches("a.#.z", "a.b.c.z"));
        assert!(!topic_matches("a.#.z", "a.b.c"));
        assert!(topic_matches("a.b", "a.b"));
        assert!(!topic_matches("a.b", "a.c"));
    }
}
