//! Operator documents (service specs, environment profiles) read from YAML or JSON, strictly.
//!
//! Parsing is pure over the text; only [`read_source`] touches a file or stdin. A document is
//! checked in four steps, each error naming the file and where in it: syntax (line and column),
//! shape (the typed fields, with line and column), unknown fields (a misspelt key is an error,
//! not silently dropped), and the proto `Validate` rules (field and value).

use std::io::Read;
use std::path::Path;

use outpost_proto::Validate;
use outpost_proto::limits::REQUEST_BODY_MAX_BYTES;
use outpost_proto::profile::EnvironmentProfile;
use outpost_proto::service::ServiceSpec;
use outpost_proto::validate::ValidationError;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_norway::with::singleton_map_recursive;

/// Text of a document and the name to show for it (`file web.yaml` or `stdin`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceText {
    pub label: String,
    pub text: String,
    pub format_hint: FormatHint,
}

/// What the file name says about the format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FormatHint {
    Json,
    Yaml,
    /// No telling extension: JSON when the text starts with `{` or `[`, else YAML.
    Sniff,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Json,
    Yaml,
}

impl Format {
    fn name(self) -> &'static str {
        match self {
            Format::Json => "JSON",
            Format::Yaml => "YAML",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DocumentError {
    #[error("cannot read {label}: {source}")]
    Read {
        label: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{label} is {size_bytes} bytes, over the limit of {limit_bytes} bytes")]
    TooLarge {
        label: String,
        size_bytes: usize,
        limit_bytes: usize,
    },
    #[error("{label} is not valid {format}: {detail}")]
    Syntax {
        label: String,
        format: &'static str,
        detail: String,
    },
    #[error("{label}{place}: {detail}")]
    Shape {
        label: String,
        place: String,
        detail: String,
    },
    #[error("{label}{place}: unknown field {field:?}; check its spelling against docs/api.md")]
    UnknownField {
        label: String,
        place: String,
        field: String,
    },
    #[error("{label}{place}: {source}")]
    Invalid {
        label: String,
        place: String,
        #[source]
        source: ValidationError,
    },
    #[error("{label} holds no {what}")]
    Empty { label: String, what: &'static str },
    #[error("{label} holds {count} documents; a profile is one document")]
    SeveralProfiles { label: String, count: usize },
}

/// Reads `path`, or stdin when `path` is `-`, refusing more than a request body may hold.
pub fn read_source(path: &Path, noun: &str) -> Result<SourceText, DocumentError> {
    let is_stdin = path.as_os_str() == "-";
    let label = if is_stdin {
        format!("{noun} from stdin")
    } else {
        format!("{noun} {}", path.display())
    };
    let limit = REQUEST_BODY_MAX_BYTES;
    let mut bytes = Vec::new();
    let read = if is_stdin {
        std::io::stdin()
            .lock()
            .take(limit as u64 + 1)
            .read_to_end(&mut bytes)
    } else {
        std::fs::File::open(path)
            .and_then(|file| file.take(limit as u64 + 1).read_to_end(&mut bytes))
    };
    read.map_err(|source| DocumentError::Read {
        label: label.clone(),
        source,
    })?;
    if bytes.len() > limit {
        return Err(DocumentError::TooLarge {
            label,
            size_bytes: bytes.len(),
            limit_bytes: limit,
        });
    }
    let text = String::from_utf8(bytes).map_err(|error| DocumentError::Syntax {
        label: label.clone(),
        format: "UTF-8",
        detail: format!(
            "invalid byte at offset {}",
            error.utf8_error().valid_up_to()
        ),
    })?;
    let format_hint = match path.extension().and_then(|extension| extension.to_str()) {
        Some("json") => FormatHint::Json,
        Some("yaml" | "yml") => FormatHint::Yaml,
        _ => FormatHint::Sniff,
    };
    Ok(SourceText {
        label,
        text,
        format_hint,
    })
}

/// Service specs: one spec, a list of specs, or (YAML) several documents of either.
pub fn parse_service_specs(source: &SourceText) -> Result<Vec<ServiceSpec>, DocumentError> {
    let specs = parse_items::<ServiceSpec>(source)?;
    if specs.is_empty() {
        return Err(DocumentError::Empty {
            label: source.label.clone(),
            what: "service spec",
        });
    }
    Ok(specs)
}

pub fn parse_route_specs(
    source: &SourceText,
) -> Result<Vec<outpost_proto::route::RouteSpec>, DocumentError> {
    let specs = parse_items::<outpost_proto::route::RouteSpec>(source)?;
    if specs.is_empty() {
        return Err(DocumentError::Empty {
            label: source.label.clone(),
            what: "route",
        });
    }
    Ok(specs)
}

/// One environment profile document.
pub fn parse_profile(source: &SourceText) -> Result<EnvironmentProfile, DocumentError> {
    let documents = untyped_documents(source)?;
    match documents.len() {
        0 => {
            return Err(DocumentError::Empty {
                label: source.label.clone(),
                what: "profile",
            });
        }
        1 => {}
        count => {
            return Err(DocumentError::SeveralProfiles {
                label: source.label.clone(),
                count,
            });
        }
    }
    if documents[0].is_array() {
        return Err(DocumentError::Shape {
            label: source.label.clone(),
            place: String::new(),
            detail: "expected one EnvironmentProfile mapping, found a list".into(),
        });
    }
    let mut profiles = parse_items::<EnvironmentProfile>(source)?;
    profiles.pop().ok_or_else(|| DocumentError::Empty {
        label: source.label.clone(),
        what: "profile",
    })
}

fn format_of(source: &SourceText) -> Format {
    match source.format_hint {
        FormatHint::Json => Format::Json,
        FormatHint::Yaml => Format::Yaml,
        FormatHint::Sniff => {
            if source.text.trim_start().starts_with(['{', '[']) {
                Format::Json
            } else {
                Format::Yaml
            }
        }
    }
}

/// Every non-empty document of the text, untyped.
fn untyped_documents(source: &SourceText) -> Result<Vec<Value>, DocumentError> {
    Ok(raw_documents(source)?.into_iter().flatten().collect())
}

/// Every document of the text, untyped, `None` for an empty YAML document (such as after a
/// trailing `---`).
fn raw_documents(source: &SourceText) -> Result<Vec<Option<Value>>, DocumentError> {
    let format = format_of(source);
    let syntax = |detail: String| DocumentError::Syntax {
        label: source.label.clone(),
        format: format.name(),
        detail,
    };
    match format {
        Format::Json => {
            let value: Value =
                serde_json::from_str(&source.text).map_err(|error| syntax(error.to_string()))?;
            Ok(vec![Some(value)])
        }
        Format::Yaml => {
            let mut documents = Vec::new();
            for document in serde_norway::Deserializer::from_str(&source.text) {
                let value = serde_norway::Value::deserialize(document)
                    .map_err(|error| syntax(error.to_string()))?;
                if value.is_null() {
                    documents.push(None);
                    continue;
                }
                let value =
                    serde_json::to_value(&value).map_err(|error| syntax(error.to_string()))?;
                documents.push(Some(value));
            }
            Ok(documents)
        }
    }
}

/// Parses every item of every document as `T`, checking shape, unknown fields and validity.
fn parse_items<T>(source: &SourceText) -> Result<Vec<T>, DocumentError>
where
    T: DeserializeOwned + Serialize + Validate,
{
    let untyped = untyped_documents(source)?;
    let several_documents = untyped.len() > 1;
    let format = format_of(source);
    let mut items = Vec::new();
    let mut typed_documents: Vec<Result<Vec<T>, String>> = Vec::new();
    match format {
        Format::Json => {
            let typed = if untyped.first().is_some_and(Value::is_array) {
                serde_json::from_str::<Vec<T>>(&source.text)
            } else {
                serde_json::from_str::<T>(&source.text).map(|item| vec![item])
            };
            typed_documents.push(typed.map_err(|error| error.to_string()));
        }
        Format::Yaml => {
            // Deserialize straight from each document so errors keep their line and column.
            for (document, shape) in
                serde_norway::Deserializer::from_str(&source.text).zip(raw_documents(source)?)
            {
                let Some(shape) = shape else { continue };
                // Enums read as one-key maps (`probe: {tcp: {port: 80}}`), as in JSON.
                let typed = if shape.is_array() {
                    singleton_map_recursive::deserialize::<Vec<T>, _>(document)
                } else {
                    singleton_map_recursive::deserialize::<T, _>(document).map(|item| vec![item])
                };
                typed_documents.push(typed.map_err(|error| error.to_string()));
            }
        }
    }
    for (document_index, (shape, typed)) in untyped.iter().zip(typed_documents).enumerate() {
        let document_place = if several_documents {
            format!(" document {}", document_index + 1)
        } else {
            String::new()
        };
        let typed = typed.map_err(|detail| DocumentError::Shape {
            label: source.label.clone(),
            place: document_place.clone(),
            detail,
        })?;
        let given_items: Vec<&Value> = match shape {
            Value::Array(list) => list.iter().collect(),
            single => vec![single],
        };
        for (item_index, (given, item)) in given_items.into_iter().zip(typed).enumerate() {
            let place = if shape.is_array() {
                format!(
                    "{document_place} item {}{}",
                    item_index + 1,
                    item_name(given)
                )
            } else {
                format!("{document_place}{}", item_name(given))
            };
            let understood = serde_json::to_value(&item).map_err(|error| DocumentError::Shape {
                label: source.label.clone(),
                place: place.clone(),
                detail: error.to_string(),
            })?;
            if let Some(field) = unknown_fields(given, &understood).into_iter().next() {
                return Err(DocumentError::UnknownField {
                    label: source.label.clone(),
                    place,
                    field,
                });
            }
            item.validate()
                .map_err(|source_error| DocumentError::Invalid {
                    label: source.label.clone(),
                    place,
                    source: source_error,
                })?;
            items.push(item);
        }
    }
    Ok(items)
}

/// ` (name "web")` when the item has a name, to help find it in a long list.
fn item_name(item: &Value) -> String {
    let name = item.get("name").or_else(|| {
        item.get("metadata")
            .and_then(|metadata| metadata.get("name"))
    });
    match name.and_then(Value::as_str) {
        Some(name) if !name.is_empty() => format!(" (name {name:?})"),
        _ => String::new(),
    }
}

/// Keys present in `given` that the typed value did not keep, as dotted paths. `understood` is
/// the typed value serialized back: every field the type knows is present there (proto types
/// never skip fields when serializing), so a key missing from it was not understood.
pub fn unknown_fields(given: &Value, understood: &Value) -> Vec<String> {
    let mut found = Vec::new();
    collect_unknown(given, understood, "", &mut found);
    found
}

fn collect_unknown(given: &Value, understood: &Value, path: &str, found: &mut Vec<String>) {
    match (given, understood) {
        (Value::Object(given), Value::Object(understood)) => {
            for (key, given_value) in given {
                let child = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                match understood.get(key) {
                    Some(understood_value) => {
                        collect_unknown(given_value, understood_value, &child, found)
                    }
                    None => found.push(child),
                }
            }
        }
        (Value::Array(given), Value::Array(understood)) => {
            for (index, (given_value, understood_value)) in given.iter().zip(understood).enumerate()
            {
                collect_unknown(
                    given_value,
                    understood_value,
                    &format!("{path}[{index}]"),
                    found,
                );
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(label: &str, hint: FormatHint, text: &str) -> SourceText {
        SourceText {
            label: label.into(),
            text: text.into(),
            format_hint: hint,
        }
    }

    const ONE_SERVICE_YAML: &str =
        "name: web\ncommand: /bin/sleep\nargs: [\"3600\"]\nreplicas: 2\nmemory_bytes: 67108864\n";

    #[test]
    fn a_single_yaml_spec_parses_with_defaults() {
        let specs =
            parse_service_specs(&source("file web.yaml", FormatHint::Yaml, ONE_SERVICE_YAML))
                .unwrap();
        assert_eq!(specs.len(), 1);
        assert_eq!(specs[0].name.as_str(), "web");
        assert_eq!(
            specs[0].replicas,
            outpost_proto::service::Replicas::Count(2)
        );
        assert_eq!(specs[0].process_type.as_str(), "web");
    }

    #[test]
    fn lists_and_several_yaml_documents_parse() {
        let text = "- name: a\n  command: /bin/true\n- name: b\n  command: /bin/true\n---\nname: c\ncommand: /bin/true\n---\n";
        let specs = parse_service_specs(&source("file s.yaml", FormatHint::Sniff, text)).unwrap();
        let names: Vec<&str> = specs.iter().map(|spec| spec.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "c"]);
    }

    #[test]
    fn json_single_and_list_parse() {
        let one = parse_service_specs(&source(
            "stdin",
            FormatHint::Sniff,
            r#"{"name":"a","command":"/x"}"#,
        ))
        .unwrap();
        assert_eq!(one.len(), 1);
        let many = parse_service_specs(&source(
            "stdin",
            FormatHint::Sniff,
            r#"[{"name":"a","command":"/x"},{"name":"b","command":"/y"}]"#,
        ))
        .unwrap();
        assert_eq!(many.len(), 2);
    }

    #[test]
    fn yaml_syntax_errors_name_the_file_and_line() {
        let error = parse_service_specs(&source(
            "file bad.yaml",
            FormatHint::Yaml,
            "name: web\n  command: [\n",
        ))
        .unwrap_err()
        .to_string();
        assert!(
            error.starts_with("file bad.yaml is not valid YAML"),
            "{error}"
        );
        assert!(error.contains("line 2"), "{error}");
    }

    #[test]
    fn json_syntax_errors_name_the_file_and_line() {
        let error = parse_service_specs(&source(
            "file bad.json",
            FormatHint::Json,
            "{\n\"name\": \"web\",\n}",
        ))
        .unwrap_err()
        .to_string();
        assert!(
            error.starts_with("file bad.json is not valid JSON"),
            "{error}"
        );
        assert!(error.contains("line 3"), "{error}");
    }

    #[test]
    fn wrong_types_name_the_field_and_line() {
        let error = parse_service_specs(&source(
            "file s.yaml",
            FormatHint::Yaml,
            "name: web\ncommand: /x\nreplicas: many\n",
        ))
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("file s.yaml") && error.contains("replicas") && error.contains("line 3"),
            "{error}"
        );
    }

    #[test]
    fn unknown_fields_are_refused_with_their_path() {
        let text = "- name: a\n  command: /x\n- name: b\n  command: /x\n  replica: 3\n";
        let error = parse_service_specs(&source("file s.yaml", FormatHint::Yaml, text))
            .unwrap_err()
            .to_string();
        assert_eq!(
            error,
            "file s.yaml item 2 (name \"b\"): unknown field \"replica\"; check its spelling against docs/api.md"
        );
        let nested =
            "name: a\ncommand: /x\nreadiness:\n  probe:\n    tcp:\n      port: 80\n      host: x\n";
        let error = parse_service_specs(&source("file s.yaml", FormatHint::Yaml, nested))
            .unwrap_err()
            .to_string();
        assert!(error.contains("\"readiness.probe.tcp.host\""), "{error}");
    }

    #[test]
    fn invalid_values_name_field_and_value() {
        let error = parse_service_specs(&source(
            "file s.json",
            FormatHint::Json,
            r#"{"name":"Web!","command":"/x"}"#,
        ))
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("file s.json")
                && error.contains("invalid name")
                && error.contains("Web!"),
            "{error}"
        );
    }

    #[test]
    fn empty_files_are_refused() {
        assert!(matches!(
            parse_service_specs(&source("file e.yaml", FormatHint::Yaml, "\n")),
            Err(DocumentError::Empty { .. })
        ));
        assert!(matches!(
            parse_profile(&source("file e.yaml", FormatHint::Yaml, "")),
            Err(DocumentError::Empty { .. })
        ));
    }

    const PROFILE_YAML: &str = "apiVersion: outpost/v1\nkind: EnvironmentProfile\nmetadata:\n  name: site\nspec:\n  storage:\n    buckets:\n      - name: media\n        versioning: true\n  broker:\n    exchanges:\n      - name: events\n";

    #[test]
    fn a_profile_parses_and_keeps_its_fields() {
        let profile =
            parse_profile(&source("file p.yaml", FormatHint::Yaml, PROFILE_YAML)).unwrap();
        assert_eq!(profile.metadata.name, "site");
        assert_eq!(profile.spec.storage.buckets[0].name.as_str(), "media");
        assert!(profile.spec.storage.buckets[0].versioning);
    }

    #[test]
    fn profile_errors_name_the_field() {
        let wrong_kind = PROFILE_YAML.replace("kind: EnvironmentProfile", "kind: Plan");
        let error = parse_profile(&source("file p.yaml", FormatHint::Yaml, &wrong_kind))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("invalid kind") && error.contains("\"Plan\""),
            "{error}"
        );
        let misspelt = PROFILE_YAML.replace("versioning", "versoning");
        let error = parse_profile(&source("file p.yaml", FormatHint::Yaml, &misspelt))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("\"spec.storage.buckets[0].versoning\""),
            "{error}"
        );
        let two = format!("{PROFILE_YAML}---\n{PROFILE_YAML}");
        assert!(matches!(
            parse_profile(&source("file p.yaml", FormatHint::Yaml, &two)),
            Err(DocumentError::SeveralProfiles { count: 2, .. })
        ));
    }

    #[test]
    fn unknown_fields_walks_objects_and_lists() {
        let given =
            serde_json::json!({"a": 1, "b": {"c": 2, "x": 3}, "l": [{"k": 1}, {"k": 1, "y": 2}]});
        let understood =
            serde_json::json!({"a": 1, "b": {"c": 2}, "l": [{"k": 1}, {"k": 1}], "default": 0});
        assert_eq!(unknown_fields(&given, &understood), ["b.x", "l[1].y"]);
    }
}
