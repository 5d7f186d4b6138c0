//! One contract per port, run against every adapter of that port: the same assertions hold for
//! the file system and S3, the in-process bus and RabbitMQ, the in-memory index and Weaviate.

use std::collections::BTreeMap;

use outpost_proto::name::Name;
use outpost_proto::profile::{
    BindingSpec, ExchangeKind, ExchangeSpec, IndexClassSpec, LifecycleRule, PropertySpec, QueueSpec,
};

use super::ports::{
    BindingCheck, DeclareCheck, EventBus, IdempotencyKey, ObjectStorage, PortError, VectorIndex,
    VersioningChange, VersioningState,
};

/// A name unique to this test run, so runs against shared servers never collide.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{prefix}-{}-{nanos:x}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

fn key(text: &str) -> IdempotencyKey {
    IdempotencyKey(format!("contract-{text}"))
}

fn name(text: &str) -> Name {
    Name::try_from(text).unwrap()
}

/// ObjectStorage contract (C2).
pub fn object_storage_contract(storage: &mut dyn ObjectStorage) {
    let bucket = unique("ct");
    assert_eq!(
        storage.read_bucket(&bucket).unwrap(),
        None,
        "a new name is no bucket"
    );
    storage.create_bucket(&bucket, &key("create")).unwrap();
    storage.create_bucket(&bucket, &key("create")).unwrap();
    let state = storage
        .read_bucket(&bucket)
        .unwrap()
        .expect("bucket exists after create");
    assert_eq!(state.versioning, VersioningState::Unversioned);
    assert!(
        state.lifecycle.is_empty() && state.tags.is_empty(),
        "{state:?}"
    );

    storage
        .set_versioning(&bucket, VersioningChange::Enable, &key("versioning"))
        .unwrap();
    assert_eq!(
        storage.read_bucket(&bucket).unwrap().unwrap().versioning,
        VersioningState::Enabled
    );

    let tmp = LifecycleRule {
        id: "tmp".into(),
        prefix: "tmp/".into(),
        expire_days: 7,
    };
    let logs = LifecycleRule {
        id: "logs".into(),
        prefix: "logs/".into(),
        expire_days: 30,
    };
    storage
        .merge_lifecycle_rules(&bucket, std::slice::from_ref(&tmp), &key("rules-1"))
        .unwrap();
    storage
        .merge_lifecycle_rules(&bucket, std::slice::from_ref(&logs), &key("rules-2"))
        .unwrap();
    let longer = LifecycleRule {
        expire_days: 14,
        ..tmp.clone()
    };
    storage
        .merge_lifecycle_rules(&bucket, std::slice::from_ref(&longer), &key("rules-3"))
        .unwrap();
    let mut rules = storage.read_bucket(&bucket).unwrap().unwrap().lifecycle;
    rules.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(rules.len(), 2, "merge keeps the other rule: {rules:?}");
    assert_eq!(
        (rules[0].id.as_str(), rules[0].expire_days),
        ("logs", Some(30))
    );
    assert_eq!(
        (
            rules[1].id.as_str(),
            rules[1].prefix.as_deref(),
            rules[1].expire_days
        ),
        ("tmp", Some("tmp/"), Some(14))
    );

    storage
        .merge_tags(
            &bucket,
            &BTreeMap::from([("owner".into(), "someone-else".into())]),
            &key("tags-1"),
        )
        .unwrap();
    storage
        .merge_tags(
            &bucket,
            &BTreeMap::from([("team".into(), "edge".into())]),
            &key("tags-2"),
        )
        .unwrap();
    storage
        .merge_tags(
            &bucket,
            &BTreeMap::from([("team".into(), "core & ops".into())]),
            &key("tags-3"),
        )
        .unwrap();
    let tags = storage.read_bucket(&bucket).unwrap().unwrap().tags;
    assert_eq!(
        tags,
        BTreeMap::from([
            ("owner".into(), "someone-else".into()),
            ("team".into(), "core & ops".into())
        ]),
        "merge keeps tags it does not manage"
    );

    assert_eq!(storage.get_object(&bucket, "a/b.txt").unwrap(), None);
    storage
        .put_object(&bucket, "a/b.txt", b"hello", &key("put-1"))
        .unwrap();
    storage
        .put_object(&bucket, "c.txt", b"", &key("put-2"))
        .unwrap();
    storage
        .put_object(&bucket, "a/b.txt", b"hello again", &key("put-3"))
        .unwrap();
    assert_eq!(
        storage.get_object(&bucket, "a/b.txt").unwrap().as_deref(),
        Some(&b"hello again"[..])
    );
    assert_eq!(
        storage.get_object(&bucket, "c.txt").unwrap().as_deref(),
        Some(&b""[..])
    );
    assert_eq!(storage.list_objects(&bucket).unwrap(), ["a/b.txt", "c.txt"]);

    let missing = unique("nb");
    let error = storage
        .put_object(&missing, "x", b"x", &key("put-missing"))
        .unwrap_err();
    assert!(
        !error.is_transient(),
        "a missing bucket is not worth retrying: {error}"
    );
}

/// EventBus contract (C3). `exchange`/`queue` names come from [`unique`].
pub fn event_bus_contract(bus: &mut dyn EventBus) {
    let exchange = ExchangeSpec {
        name: name(&unique("ct-x")),
        kind: ExchangeKind::Topic,
    };
    let queue = QueueSpec {
        name: name(&unique("ct-q")),
        message_ttl_ms: Some(60_000),
        dead_letter_exchange: None,
    };
    let binding = BindingSpec {
        exchange: exchange.name.clone(),
        queue: queue.name.clone(),
        routing_key: "sensor.#".into(),
    };

    assert_eq!(
        bus.check_exchange(&exchange).unwrap(),
        DeclareCheck::Missing
    );
    assert_eq!(bus.check_queue(&queue).unwrap(), DeclareCheck::Missing);
    bus.declare_exchange(&exchange, &key("x")).unwrap();
    bus.declare_exchange(&exchange, &key("x")).unwrap();
    bus.declare_queue(&queue, &key("q")).unwrap();
    bus.declare_queue(&queue, &key("q")).unwrap();
    assert_eq!(
        bus.check_exchange(&exchange).unwrap(),
        DeclareCheck::Matches
    );
    assert_eq!(bus.check_queue(&queue).unwrap(), DeclareCheck::Matches);
    assert_ne!(
        bus.check_binding(&binding).unwrap(),
        BindingCheck::Present,
        "not bound yet"
    );
    // What a binding does, whether or not the adapter can list it: nothing is routed to the
    // queue before it, matching keys are after it. A confirmed publish has been routed (or
    // dropped as unroutable) by the time the confirm arrives, so the empty get is not a race.
    bus.publish(&exchange.name, "sensor.early", b"early", &key("p0"))
        .unwrap();
    assert_eq!(
        bus.get(&queue.name).unwrap(),
        None,
        "nothing is routed to an unbound queue"
    );
    bus.bind(&binding, &key("b")).unwrap();
    bus.bind(&binding, &key("b")).unwrap();
    assert_ne!(bus.check_binding(&binding).unwrap(), BindingCheck::Missing);

    // A differing redeclare is drift: refused and reported, and the bus keeps working.
    let other_kind = ExchangeSpec {
        kind: ExchangeKind::Fanout,
        ..exchange.clone()
    };
    let error = bus.declare_exchange(&other_kind, &key("x2")).unwrap_err();
    assert!(matches!(error, PortError::Refused { .. }), "{error}");
    assert!(matches!(
        bus.check_exchange(&other_kind).unwrap(),
        DeclareCheck::Differs(_)
    ));
    let other_ttl = QueueSpec {
        message_ttl_ms: Some(5_000),
        ..queue.clone()
    };
    let error = bus.declare_queue(&other_ttl, &key("q2")).unwrap_err();
    assert!(matches!(error, PortError::Refused { .. }), "{error}");
    assert!(matches!(
        bus.check_queue(&other_ttl).unwrap(),
        DeclareCheck::Differs(_)
    ));
    assert_eq!(
        bus.check_queue(&queue).unwrap(),
        DeclareCheck::Matches,
        "the original is untouched"
    );

    // Topic routing with confirms.
    bus.publish(&exchange.name, "sensor.temp.kitchen", b"21.5", &key("p1"))
        .unwrap();
    bus.publish(&exchange.name, "audit.login", b"nope", &key("p2"))
        .unwrap();
    bus.publish(&exchange.name, "sensor", b"bare", &key("p3"))
        .unwrap();
    let first = wait_for_message(bus, &queue.name);
    assert_eq!(first.routing_key, "sensor.temp.kitchen");
    assert_eq!(first.payload, b"21.5");
    assert_eq!(first.idempotency_key.as_deref(), Some("contract-p1"));
    let second = wait_for_message(bus, &queue.name);
    assert_eq!(
        second.payload, b"bare",
        "'#' matches zero words; audit.login is not routed; binding twice delivers once"
    );
    assert_eq!(bus.get(&queue.name).unwrap(), None);

    let unknown = unique("ct-none");
    assert!(
        bus.publish(&unknown, "k", b"x", &key("p4")).is_err(),
        "publishing to a missing exchange fails"
    );
    // ... and the bus still works afterwards.
    bus.publish(&exchange.name, "sensor.x", b"after", &key("p5"))
        .unwrap();
    assert_eq!(wait_for_message(bus, &queue.name).payload, b"after");

    bus.delete_queue(&queue.name, &key("dq")).unwrap();
    assert_eq!(bus.check_queue(&queue).unwrap(), DeclareCheck::Missing);
    bus.delete_exchange(&exchange.name, &key("dx")).unwrap();
    assert_eq!(
        bus.check_exchange(&exchange).unwrap(),
        DeclareCheck::Missing
    );
}

/// The next message on `queue`, waiting up to 10 s for it.
pub fn wait_for_message(bus: &mut dyn EventBus, queue: &str) -> super::ports::BusMessage {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if let Some(message) = bus.get(queue).unwrap() {
            return message;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no message arrived on {queue}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// VectorIndex schema contract (C4).
pub fn vector_index_schema_contract(index: &mut dyn VectorIndex) {
    let base = unique("ct").replace('-', "_");
    let class_written = format!("doc_{base}");
    let class = super::ports::normalize_class_name(&class_written);
    assert_eq!(index.read_class(&class).unwrap(), None);
    let spec = IndexClassSpec {
        name: class_written.clone(),
        properties: vec![PropertySpec {
            name: "Title".into(),
            data_type: "text".into(),
        }],
    };
    index.create_class(&spec, &key("class")).unwrap();
    let found = index
        .read_class(&class)
        .unwrap()
        .expect("class exists after create");
    assert_eq!(found.name, class, "class names start upper-case");
    assert_eq!(
        found.properties,
        vec![PropertySpec {
            name: "title".into(),
            data_type: "text".into()
        }]
    );
    assert!(
        index.create_class(&spec, &key("class-again")).is_err(),
        "creating twice is refused"
    );

    index
        .add_property(
            &class,
            &PropertySpec {
                name: "Pages".into(),
                data_type: "int".into(),
            },
            &key("p"),
        )
        .unwrap();
    let error = index
        .add_property(
            &class,
            &PropertySpec {
                name: "TITLE".into(),
                data_type: "text".into(),
            },
            &key("p2"),
        )
        .unwrap_err();
    assert!(!error.is_transient(), "{error}");
    let found = index.read_class(&class).unwrap().unwrap();
    let names: Vec<&str> = found.properties.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["title", "pages"]);
}

/// VectorIndex data contract: upsert and k-nearest by cosine similarity.
pub fn vector_index_data_contract(index: &mut dyn VectorIndex) {
    let class =
        super::ports::normalize_class_name(&format!("vec_{}", unique("ct").replace('-', "_")));
    let spec = IndexClassSpec {
        name: class.clone(),
        properties: vec![PropertySpec {
            name: "label".into(),
            data_type: "text".into(),
        }],
    };
    index.create_class(&spec, &key("class")).unwrap();
    let ids = [
        "00000000-0000-4000-8000-000000000001",
        "00000000-0000-4000-8000-000000000002",
        "00000000-0000-4000-8000-000000000003",
    ];
    let vectors: [[f32; 3]; 3] = [[1.0, 0.0, 0.0], [0.7, 0.7, 0.0], [0.0, 0.0, 1.0]];
    for (id, vector) in ids.iter().zip(vectors) {
        let properties = BTreeMap::from([("label".to_string(), format!("object {id}"))]);
        index
            .upsert(&class, id, &vector, &properties, &key(id))
            .unwrap();
    }
    // Upsert again replaces, it does not duplicate.
    index
        .upsert(
            &class,
            ids[2],
            &[0.0, 0.1, 1.0],
            &BTreeMap::new(),
            &key("again"),
        )
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let hits = loop {
        let hits = index.nearest(&class, &[1.0, 0.1, 0.0], 2).unwrap();
        if hits.len() == 2 || std::time::Instant::now() > deadline {
            break hits;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let hit_ids: Vec<&str> = hits.iter().map(|hit| hit.id.as_str()).collect();
    assert_eq!(hit_ids, [ids[0], ids[1]]);
    assert!(
        hits[0].score > hits[1].score && hits[0].score <= 1.0001,
        "{hits:?}"
    );
    assert_eq!(
        index.nearest(&class, &[0.0, 0.0, 1.0], 10).unwrap().len(),
        3
    );
    assert_eq!(
        index.nearest(&class, &[0.0, 0.0, 1.0], 10).unwrap()[0].id,
        ids[2],
        "the replaced vector is the one searched"
    );

    let error = index
        .upsert(
            &class,
            "not-a-uuid",
            &[1.0, 0.0, 0.0],
            &BTreeMap::new(),
            &key("bad"),
        )
        .unwrap_err();
    assert!(
        !error.is_transient() && error.to_string().contains("\"not-a-uuid\""),
        "{error}"
    );
}

#[test]
fn filesystem_storage_meets_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    object_storage_contract(&mut super::FsObjectStorage::new(dir.path().join("storage")));
}

#[test]
fn in_process_bus_meets_the_contract() {
    event_bus_contract(&mut super::InProcessBus::new());
}

#[test]
fn in_memory_index_meets_the_contract() {
    let mut index = super::InMemoryIndex::new();
    vector_index_schema_contract(&mut index);
    vector_index_data_contract(&mut index);
}

/// The fake stands in for Weaviate: its schema and object REST APIs and GraphQL
/// `Get { Class(nearVector: …) }`; the adapter speaks real HTTP to it.
#[cfg(feature = "weaviate")]
#[test]
fn weaviate_adapter_meets_the_contract_against_the_fake() {
    let fake = super::weaviate_fake::FakeWeaviate::start();
    let mut index = super::weaviate::WeaviateIndex::new(&fake.url());
    vector_index_schema_contract(&mut index);
    vector_index_data_contract(&mut index);
}
