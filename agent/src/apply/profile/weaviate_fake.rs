//! FakeWeaviate: an in-process fake of Weaviate's schema REST API on a loopback port, for tests
//! (no Weaviate server can be had here). It follows Weaviate's documented behaviour:
//! - `GET /v1/schema/{class}`: 200 with the class, or 404 with an empty body; the class name in
//!   the path is read with its first letter upper-cased;
//! - `POST /v1/schema`: class first letter upper-cased, property first letters lower-cased;
//!   an existing class (compared case-insensitively) → 422
//!   `{"error":[{"message":"class name \"Document\" already exists"}]}`;
//! - `POST /v1/schema/{class}/properties`: an existing property (case-insensitive) → 422
//!   `class "Document": conflict for property "title": already in use or provided multiple times`;
//!   a missing class → 422 `class "X" not found`;
//! - an unknown data type → 422 naming it; the deprecated `string` is stored as `text`.
//!
//! Objects and GraphQL are not faked; the live test covers them when `WEAVIATE_URL` is set.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use serde_json::{Value, json};

const DATA_TYPES: &[&str] = &[
    "text",
    "text[]",
    "int",
    "int[]",
    "number",
    "number[]",
    "boolean",
    "boolean[]",
    "date",
    "date[]",
    "uuid",
    "uuid[]",
    "geoCoordinates",
    "phoneNumber",
    "blob",
    "object",
    "object[]",
];

pub struct FakeWeaviate {
    port: u16,
    classes: Arc<Mutex<Vec<Value>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeWeaviate {
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the fake weaviate");
        let port = listener.local_addr().expect("fake weaviate address").port();
        let classes = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (classes, stop) = (classes.clone(), stop.clone());
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    if let Ok(stream) = stream {
                        let classes = classes.clone();
                        std::thread::spawn(move || serve(stream, &classes));
                    }
                }
            })
        };
        Self {
            port,
            classes,
            stop,
            thread: Some(thread),
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn class_names(&self) -> Vec<String> {
        let classes = self.classes.lock().unwrap_or_else(|p| p.into_inner());
        classes
            .iter()
            .filter_map(|class| class["class"].as_str().map(str::to_string))
            .collect()
    }
}

impl Drop for FakeWeaviate {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn upper_first(name: &str) -> String {
    super::ports::normalize_class_name(name)
}

fn lower_first(name: &str) -> String {
    super::ports::normalize_property_name(name)
}

fn error(message: String) -> (u16, Vec<u8>) {
    (
        422,
        json!({"error": [{"message": message}]})
            .to_string()
            .into_bytes(),
    )
}

fn check_property(class: &str, property: &Value) -> Result<Value, (u16, Vec<u8>)> {
    let name = property["name"].as_str().unwrap_or_default();
    if name.is_empty() {
        return Err(error(format!("class {class:?}: property name is empty")));
    }
    let mut types = Vec::new();
    for data_type in property["dataType"].as_array().cloned().unwrap_or_default() {
        let data_type = data_type.as_str().unwrap_or_default();
        let data_type = if data_type == "string" {
            "text"
        } else {
            data_type
        };
        let is_reference = data_type.starts_with(|c: char| c.is_ascii_uppercase());
        if !DATA_TYPES.contains(&data_type) && !is_reference {
            return Err(error(format!(
                "property {name:?}: invalid dataType: unknown primitive data type {data_type:?}"
            )));
        }
        types.push(Value::from(data_type));
    }
    if types.is_empty() {
        return Err(error(format!("property {name:?}: dataType is required")));
    }
    Ok(json!({"name": lower_first(name), "dataType": types}))
}

fn handle(method: &str, path: &str, body: &[u8], classes: &Mutex<Vec<Value>>) -> (u16, Vec<u8>) {
    let mut classes = classes.lock().unwrap_or_else(|p| p.into_inner());
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    match (method, segments.as_slice()) {
        ("GET", ["v1", "schema"]) => (200, json!({"classes": *classes}).to_string().into_bytes()),
        ("GET", ["v1", "schema", name]) => {
            let name = upper_first(name);
            match classes.iter().find(|class| class["class"] == name.as_str()) {
                Some(class) => (200, class.to_string().into_bytes()),
                None => (404, Vec::new()),
            }
        }
        ("POST", ["v1", "schema"]) => {
            let Some(document) = parsed else {
                return error("invalid JSON body".into());
            };
            let name = upper_first(document["class"].as_str().unwrap_or_default());
            if name.is_empty() {
                return error("class name is empty".into());
            }
            if let Some(existing) = classes.iter().find(|class| {
                class["class"]
                    .as_str()
                    .is_some_and(|existing| existing.eq_ignore_ascii_case(&name))
            }) {
                return error(format!(
                    "class name {:?} already exists",
                    existing["class"].as_str().unwrap_or_default()
                ));
            }
            let mut properties: Vec<Value> = Vec::new();
            for property in document["properties"]
                .as_array()
                .cloned()
                .unwrap_or_default()
            {
                let property = match check_property(&name, &property) {
                    Ok(property) => property,
                    Err(answer) => return answer,
                };
                let new_name = property["name"].as_str().unwrap_or_default().to_string();
                if properties.iter().any(|p| {
                    p["name"]
                        .as_str()
                        .is_some_and(|n| n.eq_ignore_ascii_case(&new_name))
                }) {
                    return error(format!(
                        "class {name:?}: conflict for property {new_name:?}: already in use or provided multiple times"
                    ));
                }
                properties.push(property);
            }
            let class = json!({
                "class": name,
                "vectorizer": document["vectorizer"].as_str().unwrap_or("none"),
                "properties": properties,
            });
            classes.push(class.clone());
            (200, class.to_string().into_bytes())
        }
        ("POST", ["v1", "schema", name, "properties"]) => {
            let name = upper_first(name);
            let Some(property) = parsed else {
                return error("invalid JSON body".into());
            };
            let Some(class) = classes
                .iter_mut()
                .find(|class| class["class"] == name.as_str())
            else {
                return error(format!("class {name:?} not found"));
            };
            let property = match check_property(&name, &property) {
                Ok(property) => property,
                Err(answer) => return answer,
            };
            let new_name = property["name"].as_str().unwrap_or_default().to_string();
            let list = class["properties"].as_array_mut();
            let Some(list) = list else {
                return error("class has no property list".into());
            };
            if list.iter().any(|p| {
                p["name"]
                    .as_str()
                    .is_some_and(|n| n.eq_ignore_ascii_case(&new_name))
            }) {
                return error(format!(
                    "class {name:?}: conflict for property {new_name:?}: already in use or provided multiple times"
                ));
            }
            list.push(property.clone());
            (200, property.to_string().into_bytes())
        }
        _ => (404, Vec::new()),
    }
}

fn serve(stream: TcpStream, classes: &Mutex<Vec<Value>>) -> std::io::Result<()> {
    stream.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut stream = stream;
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line)? == 0 {
            return Ok(());
        }
        let mut parts = request_line.split_whitespace();
        let (method, path) = (
            parts.next().unwrap_or("").to_string(),
            parts.next().unwrap_or("/").to_string(),
        );
        let mut content_length = 0usize;
        let mut close = false;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 {
                return Ok(());
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                match name.trim().to_ascii_lowercase().as_str() {
                    "content-length" => content_length = value.trim().parse().unwrap_or(0),
                    "connection" => close = value.trim().eq_ignore_ascii_case("close"),
                    _ => {}
                }
            }
        }
        let mut body = vec![0u8; content_length.min(1 << 20)];
        reader.read_exact(&mut body)?;
        let (status, answer) = handle(&method, &path, &body, classes);
        let reason = match status {
            200 => "OK",
            404 => "Not Found",
            _ => "Unprocessable Entity",
        };
        let content_type = if answer.is_empty() {
            ""
        } else {
            "Content-Type: application/json\r\n"
        };
        write!(
            stream,
            "HTTP/1.1 {status} {reason}\r\n{content_type}Content-Length: {}\r\n\r\n",
            answer.len()
        )?;
        stream.write_all(&answer)?;
        stream.flush()?;
        if close {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fake_answers_like_weaviate() {
        let classes = Mutex::new(Vec::new());
        assert_eq!(
            handle("GET", "/v1/schema/document", b"", &classes),
            (404, Vec::new()),
            "404 with an empty body"
        );
        let created = handle(
            "POST",
            "/v1/schema",
            br#"{"class":"document","properties":[{"name":"Title","dataType":["string"]}]}"#,
            &classes,
        );
        assert_eq!(created.0, 200);
        let (status, body) = handle("GET", "/v1/schema/document", b"", &classes);
        assert_eq!(status, 200);
        let class: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(class["class"], "Document");
        assert_eq!(
            class["properties"][0],
            json!({"name": "title", "dataType": ["text"]})
        );
        let (status, body) = handle("POST", "/v1/schema", br#"{"class":"DOCUMENT"}"#, &classes);
        assert_eq!(status, 422);
        assert_eq!(
            String::from_utf8(body).unwrap(),
            r#"{"error":[{"message":"class name \"Document\" already exists"}]}"#
        );
        let (status, body) = handle(
            "POST",
            "/v1/schema/Document/properties",
            br#"{"name":"TITLE","dataType":["text"]}"#,
            &classes,
        );
        assert_eq!(status, 422);
        assert!(
            String::from_utf8(body)
                .unwrap()
                .contains("conflict for property")
        );
        let (status, body) = handle(
            "POST",
            "/v1/schema/Document/properties",
            br#"{"name":"x","dataType":["float"]}"#,
            &classes,
        );
        assert_eq!(status, 422);
        assert!(String::from_utf8(body).unwrap().contains("\\\"float\\\""));
    }
}
