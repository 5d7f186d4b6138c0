//! Weaviate VectorIndex adapter (feature `weaviate`, C4): REST over ureq. Ensures classes, adds
//! missing properties, and never drops or retypes anything: Weaviate cannot change a property's
//! data type, so a retype is reported `needs migration`. Objects go through the single-object
//! REST API (`PUT`, then `POST` when absent); k-nearest is a GraphQL `Get` with `nearVector`.
//!
//! Names follow Weaviate's rules (class first letter upper, property first letter lower,
//! compared case-insensitively); see `ports::normalize_*`.

use std::collections::BTreeMap;
use std::time::Duration;

use outpost_proto::profile::{IndexClassSpec, PropertySpec};
use serde_json::{Value, json};

use super::ports::{
    AdapterIdentity, AdapterKind, ClassState, IdempotencyKey, Neighbour, PortError, VectorIndex,
    normalize_class, normalize_class_name, normalize_data_type, normalize_object_id,
    normalize_property_name,
};

const CALL_TIMEOUT: Duration = Duration::from_secs(30);
const ANSWER_MAX_BYTES: u64 = 16 * 1024 * 1024;
const IDEMPOTENCY_HEADER: &str = "X-Outpost-Idempotency-Key";

pub struct WeaviateIndex {
    base_url: String,
    agent: ureq::Agent,
}

struct Answer {
    status: u16,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }

    /// Weaviate's error body: `{"error":[{"message":"…"}]}`.
    fn messages(&self) -> String {
        let Some(value) = self.json() else {
            return String::from_utf8_lossy(&self.body).into_owned();
        };
        match value.get("error").and_then(Value::as_array) {
            Some(errors) => errors
                .iter()
                .filter_map(|error| error.get("message").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join("; "),
            None => value.to_string(),
        }
    }

    fn error(&self, operation: &'static str, target: &str) -> PortError {
        let detail = format!("http {}: {}", self.status, self.messages());
        if self.status >= 500 || self.status == 429 {
            PortError::transient(operation, target, detail)
        } else {
            PortError::refused(operation, target, detail)
        }
    }
}

impl WeaviateIndex {
    /// `url` is the Weaviate base URL, e.g. `http://127.0.0.1:8080`.
    pub fn new(url: &str) -> Self {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(CALL_TIMEOUT))
            .http_status_as_error(false)
            .build()
            .into();
        Self {
            base_url: url.trim_end_matches('/').to_string(),
            agent,
        }
    }

    fn call(
        &self,
        operation: &'static str,
        target: &str,
        method: &str,
        path: &str,
        body: Option<&Value>,
        key: Option<&IdempotencyKey>,
    ) -> Result<Answer, PortError> {
        let url = format!("{}{path}", self.base_url);
        let result = match body {
            Some(body) => {
                let bytes = serde_json::to_vec(body)
                    .map_err(|error| PortError::refused(operation, target, error))?;
                let mut request = if method == "PUT" {
                    self.agent.put(&url)
                } else {
                    self.agent.post(&url)
                };
                request = request.header("Content-Type", "application/json");
                if let Some(key) = key {
                    request = request.header(IDEMPOTENCY_HEADER, key.as_str());
                }
                request.send(&bytes[..])
            }
            None => self.agent.get(&url).call(),
        };
        let mut response =
            result.map_err(|error| PortError::transient(operation, target, error))?;
        let status = response.status().as_u16();
        let body = response
            .body_mut()
            .with_config()
            .limit(ANSWER_MAX_BYTES)
            .read_to_vec()
            .map_err(|error| PortError::transient(operation, target, error))?;
        Ok(Answer { status, body })
    }
}

/// Parses a class document from `GET /v1/schema/{class}`.
pub fn parse_class(value: &Value) -> Option<ClassState> {
    let name = value.get("class")?.as_str()?.to_string();
    let properties = value
        .get("properties")
        .and_then(Value::as_array)
        .map(|properties| {
            properties
                .iter()
                .filter_map(|property| {
                    let name = property.get("name")?.as_str()?;
                    let data_type = property
                        .get("dataType")
                        .and_then(Value::as_array)
                        .map(|types| {
                            types
                                .iter()
                                .filter_map(Value::as_str)
                                .collect::<Vec<_>>()
                                .join(",")
                        })
                        .unwrap_or_default();
                    Some(PropertySpec {
                        name: name.to_string(),
                        data_type: normalize_data_type(&data_type),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    Some(ClassState { name, properties })
}

/// The class document Weaviate's `POST /v1/schema` takes. Vectors come from the caller.
pub fn class_document(class: &IndexClassSpec) -> Value {
    let class = normalize_class(class);
    json!({
        "class": class.name,
        "vectorizer": "none",
        "properties": class.properties.iter().map(property_document).collect::<Vec<_>>(),
    })
}

fn property_document(property: &PropertySpec) -> Value {
    json!({ "name": normalize_property_name(&property.name), "dataType": [property.data_type] })
}

/// The GraphQL query for the `limit` nearest objects of `class`.
pub fn near_vector_query(class: &str, vector: &[f32], limit: usize) -> String {
    let numbers: Vec<String> = vector.iter().map(|x| format!("{x}")).collect();
    format!(
        "{{ Get {{ {class}(nearVector: {{vector: [{}]}}, limit: {limit}) {{ _additional {{ id distance }} }} }} }}",
        numbers.join(", ")
    )
}

impl VectorIndex for WeaviateIndex {
    fn identity(&self) -> AdapterIdentity {
        AdapterIdentity {
            kind: AdapterKind::Weaviate,
            location: self.base_url.clone(),
        }
    }

    fn read_class(&mut self, class: &str) -> Result<Option<ClassState>, PortError> {
        let class = normalize_class_name(class);
        let answer = self.call(
            "read class",
            &class,
            "GET",
            &format!("/v1/schema/{class}"),
            None,
            None,
        )?;
        match answer.status {
            200 => {
                let value = answer
                    .json()
                    .ok_or_else(|| PortError::bad_answer("read class", &class, "not JSON"))?;
                parse_class(&value)
                    .map(Some)
                    .ok_or_else(|| PortError::bad_answer("read class", &class, "no class name"))
            }
            404 => Ok(None),
            _ => Err(answer.error("read class", &class)),
        }
    }

    fn create_class(
        &mut self,
        class: &IndexClassSpec,
        key: &IdempotencyKey,
    ) -> Result<(), PortError> {
        let document = class_document(class);
        let name = normalize_class_name(&class.name);
        let answer = self.call(
            "create class",
            &name,
            "POST",
            "/v1/schema",
            Some(&document),
            Some(key),
        )?;
        if answer.status == 200 {
            Ok(())
        } else {
            Err(answer.error("create class", &name))
        }
    }

    fn add_property(
        &mut self,
        class: &str,
        property: &PropertySpec,
        key: &IdempotencyKey,
    ) -> Result<(), PortError> {
        let class = normalize_class_name(class);
        let target = format!("{class}.{}", property.name);
        let answer = self.call(
            "add property",
            &target,
            "POST",
            &format!("/v1/schema/{class}/properties"),
            Some(&property_document(property)),
            Some(key),
        )?;
        if answer.status == 200 {
            Ok(())
        } else {
            Err(answer.error("add property", &target))
        }
    }

    fn retype_property(
        &mut self,
        class: &str,
        property: &PropertySpec,
        _key: &IdempotencyKey,
    ) -> Result<(), PortError> {
        Err(PortError::Unsupported {
            operation: "retype property",
            target: format!("{class}.{}", property.name),
            adapter: "weaviate",
            message: "weaviate cannot change a property's data type; migrate the data into a new property or class".into(),
        })
    }

    /// `PUT /v1/objects/{class}/{id}` replaces an existing object; a 404 means there is none
    /// yet, so `POST /v1/objects` creates it (and if another writer created it in between, the
    /// 422 `already exists` is followed by one more PUT). Both carry the idempotency key.
    fn upsert(
        &mut self,
        class: &str,
        id: &str,
        vector: &[f32],
        properties: &BTreeMap<String, String>,
        key: &IdempotencyKey,
    ) -> Result<(), PortError> {
        let class = normalize_class_name(class);
        let id = normalize_object_id("upsert object", &class, id)?;
        let target = format!("{class}/{id}");
        let properties: serde_json::Map<String, Value> = properties
            .iter()
            .map(|(name, value)| (normalize_property_name(name), Value::from(value.clone())))
            .collect();
        let object =
            json!({ "class": class, "id": id, "properties": properties, "vector": vector });
        let replace_path = format!("/v1/objects/{class}/{id}");
        let replace = |index: &Self| {
            index.call(
                "upsert object",
                &target,
                "PUT",
                &replace_path,
                Some(&object),
                Some(key),
            )
        };
        let replaced = replace(self)?;
        match replaced.status {
            200..=299 => return Ok(()),
            404 => {}
            _ => return Err(replaced.error("upsert object", &target)),
        }
        let created = self.call(
            "upsert object",
            &target,
            "POST",
            "/v1/objects",
            Some(&object),
            Some(key),
        )?;
        match created.status {
            200..=299 => Ok(()),
            422 if created.messages().contains("already exists") => {
                let replaced = replace(self)?;
                if (200..=299).contains(&replaced.status) {
                    Ok(())
                } else {
                    Err(replaced.error("upsert object", &target))
                }
            }
            _ => Err(created.error("upsert object", &target)),
        }
    }

    fn nearest(
        &mut self,
        class: &str,
        vector: &[f32],
        limit: usize,
    ) -> Result<Vec<Neighbour>, PortError> {
        let class = normalize_class_name(class);
        let body = json!({ "query": near_vector_query(&class, vector, limit) });
        let answer = self.call("nearest", &class, "POST", "/v1/graphql", Some(&body), None)?;
        if answer.status != 200 {
            return Err(answer.error("nearest", &class));
        }
        let value = answer
            .json()
            .ok_or_else(|| PortError::bad_answer("nearest", &class, "not JSON"))?;
        if let Some(errors) = value
            .get("errors")
            .and_then(Value::as_array)
            .filter(|errors| !errors.is_empty())
        {
            return Err(PortError::refused(
                "nearest",
                class,
                Value::from(errors.clone()),
            ));
        }
        let hits = value
            .pointer(&format!("/data/Get/{class}"))
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        Ok(hits
            .iter()
            .filter_map(|hit| {
                let id = hit.pointer("/_additional/id")?.as_str()?.to_string();
                let distance = hit.pointer("/_additional/distance")?.as_f64()? as f32;
                Some(Neighbour {
                    id,
                    score: 1.0 - distance,
                })
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_documents_are_normalised() {
        let class = IndexClassSpec {
            name: "document".into(),
            properties: vec![PropertySpec {
                name: "Title".into(),
                data_type: "string".into(),
            }],
        };
        assert_eq!(
            class_document(&class),
            json!({"class": "Document", "vectorizer": "none", "properties": [{"name": "title", "dataType": ["text"]}]})
        );
        let parsed = parse_class(
            &json!({"class": "Document", "properties": [{"name": "pages", "dataType": ["int"]}]}),
        );
        assert_eq!(
            parsed.unwrap().properties[0],
            PropertySpec {
                name: "pages".into(),
                data_type: "int".into()
            }
        );
        assert!(
            near_vector_query("Doc", &[1.0, 0.5], 3)
                .contains("Doc(nearVector: {vector: [1, 0.5]}, limit: 3)")
        );
    }

    /// Seed cases against the fake: created once then no-ops; a property added to the profile
    /// is added; an incompatible change is reported `needs migration`, even when a destructive
    /// apply was acknowledged.
    #[test]
    fn engine_against_weaviate_fake_adds_properties_and_reports_needs_migration() {
        use super::super::diff::DestructivePolicy;
        use super::super::engine::{Outcome, RunMode, UnchangedPolicy};
        use super::super::engine_tests::{Harness, seed_profile};
        let fake = super::super::weaviate_fake::FakeWeaviate::start();
        let mut harness = Harness::new();
        harness.adapters.index = Box::new(WeaviateIndex::new(&fake.url()));
        let mut profile = seed_profile();
        let first = harness.run(&profile, UnchangedPolicy::VerifyActual);
        assert_eq!(first.components[2].outcome, Outcome::Applied, "{first:#?}");
        let second = harness.run(&profile, UnchangedPolicy::VerifyActual);
        assert_eq!(second.components[2].outcome, Outcome::Unchanged);
        assert_eq!(fake.class_names(), ["Document"]);

        profile.spec.index.classes[0].properties.push(PropertySpec {
            name: "Pages".into(),
            data_type: "int".into(),
        });
        let added = harness.run(&profile, UnchangedPolicy::Skip);
        assert_eq!(added.components[2].outcome, Outcome::Applied);
        assert_eq!(added.components[2].steps_applied.len(), 1);

        profile.spec.index.classes[0].properties[1].data_type = "text".into();
        let incompatible = harness.run(&profile, UnchangedPolicy::Skip);
        assert_eq!(incompatible.components[2].outcome, Outcome::NeedsAttention);
        assert!(incompatible.components[2].needs_migration[0].contains("needs migration"));

        profile.spec.allow_destructive = true;
        let dry = harness
            .run_with(
                &profile,
                UnchangedPolicy::Skip,
                DestructivePolicy::Withhold,
                RunMode::DryRun,
            )
            .unwrap();
        let acknowledged = DestructivePolicy::Acknowledged {
            diff_hash: dry.diff_hash,
        };
        let forced = harness
            .run_with(
                &profile,
                UnchangedPolicy::Skip,
                acknowledged,
                RunMode::Apply,
            )
            .unwrap();
        let index = &forced.components[2];
        assert_eq!(index.outcome, Outcome::NeedsAttention, "{index:#?}");
        assert!(
            index.needs_migration[0].contains("cannot change a property's data type"),
            "{index:?}"
        );
        let class = WeaviateIndex::new(&fake.url())
            .read_class("document")
            .unwrap()
            .unwrap();
        assert_eq!(class.properties[1].data_type, "int", "nothing was retyped");
    }

    /// Runs only when `WEAVIATE_URL` points at a real Weaviate; otherwise it checks nothing.
    #[test]
    fn live_weaviate_meets_the_contract_when_configured() {
        let Ok(url) = std::env::var("WEAVIATE_URL") else {
            eprintln!("WEAVIATE_URL is not set: the live Weaviate contract did not run");
            return;
        };
        let mut index = WeaviateIndex::new(&url);
        super::super::contract_tests::vector_index_schema_contract(&mut index);
        super::super::contract_tests::vector_index_data_contract(&mut index);
    }
}
