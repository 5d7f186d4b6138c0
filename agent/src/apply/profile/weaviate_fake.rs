//! FakeWeaviate: an in-process fake of Weaviate on a loopback port, for tests. It stands in for
//! a Weaviate server (none can be had here) behind the Weaviate adapter: its schema REST API,
//! the single-object REST API and the GraphQL `Get` with `nearVector`, in the shapes Weaviate
//! documents (REST `/v1/schema`, `/v1/objects`; GraphQL `Get`, `_additional { id distance }`).
//! It is a fake, not Weaviate: one process, brute force instead of HNSW, only the parts the
//! adapter uses. It follows Weaviate's documented behaviour:
//! - `GET /v1/schema/{class}`: 200 with the class, or 404 with an empty body; the class name in
//!   the path is read with its first letter upper-cased;
//! - `POST /v1/schema`: class first letter upper-cased, property first letters lower-cased;
//!   an existing class (compared case-insensitively) → 422
//!   `{"error":[{"message":"class name \"Document\" already exists"}]}`;
//! - `POST /v1/schema/{class}/properties`: an existing property (case-insensitive) → 422
//!   `class "Document": conflict for property "title": already in use or provided multiple times`;
//!   a missing class → 422 `class "X" not found`;
//! - an unknown data type → 422 naming it; the deprecated `string` is stored as `text`;
//! - `POST /v1/objects` (body `class`, `id`, `properties`, `vector`): 200 with the object; an
//!   id the class already holds → 422 `id '…' already exists`; a class not in the schema, an id
//!   that is not a UUID, or a property the class lacks → 422 `invalid object: …` (like a
//!   Weaviate with `AUTOSCHEMA_ENABLED=false`: objects must fit the schema); a vector whose
//!   length differs from the class's other vectors → 500, as the vector index refuses it;
//!   ids are stored lower-case;
//! - `PUT /v1/objects/{class}/{id}`: replaces the object's properties and vector, 200 with the
//!   object; 404 with an empty body when the class holds no such object; a body `id` that differs
//!   from the path → 422 `invalid update: field 'id' is immutable`;
//! - `GET /v1/objects/{class}/{id}`: 200 with the object, or 404 with an empty body;
//! - `POST /v1/graphql` `{"query": "{ Get { Class(nearVector: {vector: […]}, limit: N) { prop
//!   _additional { id distance certainty } } } }"}`: 200 with `{"data": {"Get": {"Class": [hits]}}}`,
//!   nearest first by cosine distance (`1 - cosine similarity`, Weaviate's default metric;
//!   `certainty = 1 - distance / 2`), objects without a vector left out, `limit` defaulting to
//!   10; an unknown class, field or argument → 200 with `{"errors": [{"message": "Cannot query
//!   field …"}], "data": null}`; a query vector of another length → `errors` and `Get.Class: null`.

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

/// An object as the fake holds it.
#[derive(Debug, Clone)]
struct StoredObject {
    class: String,
    id: String,
    properties: serde_json::Map<String, Value>,
    vector: Option<Vec<f64>>,
}

impl StoredObject {
    fn document(&self) -> Value {
        let mut document =
            json!({"class": self.class, "id": self.id, "properties": self.properties});
        if let Some(vector) = &self.vector {
            document["vector"] = json!(vector);
        }
        document
    }
}

/// Everything the fake holds: class documents as Weaviate returns them, and objects.
#[derive(Debug, Default)]
struct State {
    classes: Vec<Value>,
    objects: Vec<StoredObject>,
}

pub struct FakeWeaviate {
    port: u16,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeWeaviate {
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the fake weaviate");
        let port = listener.local_addr().expect("fake weaviate address").port();
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (state, stop) = (state.clone(), stop.clone());
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    if let Ok(stream) = stream {
                        let state = state.clone();
                        std::thread::spawn(move || serve(stream, &state));
                    }
                }
            })
        };
        Self {
            port,
            state,
            stop,
            thread: Some(thread),
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn class_names(&self) -> Vec<String> {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state
            .classes
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

fn handle(method: &str, path: &str, body: &[u8], state: &Mutex<State>) -> (u16, Vec<u8>) {
    let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
    let path = path.split('?').next().unwrap_or_default();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    let State { classes, objects } = &mut *state;
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
        ("POST", ["v1", "objects"]) => {
            let Some(document) = parsed else {
                return error("invalid JSON body".into());
            };
            let object = match check_object(classes, objects, &document) {
                Ok(object) => object,
                Err(answer) => return answer,
            };
            if objects
                .iter()
                .any(|held| held.class == object.class && held.id == object.id)
            {
                return error(format!("id '{}' already exists", object.id));
            }
            let answer = object.document().to_string().into_bytes();
            objects.push(object);
            (200, answer)
        }
        ("PUT", ["v1", "objects", class, id]) => {
            let Some(mut document) = parsed else {
                return error("invalid JSON body".into());
            };
            let (class, id) = (upper_first(class), id.to_ascii_lowercase());
            let Some(index) = objects
                .iter()
                .position(|held| held.class == class && held.id == id)
            else {
                return (404, Vec::new());
            };
            if document["id"].as_str().map(str::to_ascii_lowercase) != Some(id.clone()) {
                return error("invalid update: field 'id' is immutable".into());
            }
            document["class"] = Value::from(class);
            let others: Vec<StoredObject> = objects
                .iter()
                .enumerate()
                .filter(|(other, _)| *other != index)
                .map(|(_, held)| held.clone())
                .collect();
            let object = match check_object(classes, &others, &document) {
                Ok(object) => object,
                Err(answer) => return answer,
            };
            let answer = object.document().to_string().into_bytes();
            objects[index] = object;
            (200, answer)
        }
        ("GET", ["v1", "objects", class, id]) => {
            let (class, id) = (upper_first(class), id.to_ascii_lowercase());
            match objects
                .iter()
                .find(|held| held.class == class && held.id == id)
            {
                Some(object) => (200, object.document().to_string().into_bytes()),
                None => (404, Vec::new()),
            }
        }
        ("POST", ["v1", "graphql"]) => {
            let query = parsed
                .as_ref()
                .and_then(|body| body["query"].as_str())
                .unwrap_or_default();
            (
                200,
                graphql(classes, objects, query).to_string().into_bytes(),
            )
        }
        _ => (404, Vec::new()),
    }
}

/// Validates an object document against the schema and the class's other vectors, as
/// `POST /v1/objects` and `PUT /v1/objects/…` do.
fn check_object(
    classes: &[Value],
    others: &[StoredObject],
    document: &Value,
) -> Result<StoredObject, (u16, Vec<u8>)> {
    let class = upper_first(document["class"].as_str().unwrap_or_default());
    let Some(schema) = classes.iter().find(|held| held["class"] == class.as_str()) else {
        return Err(error(format!(
            "invalid object: class {class:?} not found in schema"
        )));
    };
    let id_text = document["id"].as_str().unwrap_or_default();
    let Ok(id) = super::ports::normalize_object_id("check object", &class, id_text) else {
        return Err(error(format!(
            "invalid object: invalid UUID length: {}",
            id_text.len()
        )));
    };
    let empty = serde_json::Map::new();
    let given = document["properties"].as_object().unwrap_or(&empty);
    let mut properties = serde_json::Map::new();
    for (name, value) in given {
        let found = schema["properties"].as_array().and_then(|list| {
            list.iter().find(|property| {
                property["name"]
                    .as_str()
                    .is_some_and(|held| held.eq_ignore_ascii_case(name))
            })
        });
        let Some(found) = found else {
            return Err(error(format!(
                "invalid object: no such prop with name '{name}' found in class '{class}' in the schema. Check your schema files for which properties in this class are available"
            )));
        };
        let data_type = found["dataType"][0].as_str().unwrap_or_default();
        let fits = match data_type {
            "text" => value.is_string(),
            "int" => value.is_i64() || value.is_u64(),
            "number" => value.is_number(),
            "boolean" => value.is_boolean(),
            _ => true,
        };
        if !fits {
            return Err(error(format!(
                "invalid object: invalid {data_type} property '{name}' on class '{class}': not a {data_type}"
            )));
        }
        properties.insert(
            found["name"].as_str().unwrap_or(name).to_string(),
            value.clone(),
        );
    }
    let vector = match &document["vector"] {
        Value::Null => None,
        Value::Array(numbers) => {
            let numbers: Option<Vec<f64>> = numbers.iter().map(Value::as_f64).collect();
            let Some(numbers) = numbers else {
                return Err(error("invalid object: vector holds a non-number".into()));
            };
            Some(numbers)
        }
        other => {
            return Err(error(format!(
                "invalid object: vector is not an array: {other}"
            )));
        }
    };
    let held_length = others
        .iter()
        .filter(|held| held.class == class)
        .find_map(|held| held.vector.as_ref().map(Vec::len));
    if let (Some(vector), Some(held_length)) = (&vector, held_length)
        && vector.len() != held_length
    {
        return Err((
            500,
            json!({"error": [{"message": format!(
                "put object: import into index {}: new node has a vector with length {}. Existing nodes have vectors with length {held_length}",
                class.to_ascii_lowercase(),
                vector.len()
            )}]})
            .to_string()
            .into_bytes(),
        ));
    }
    Ok(StoredObject {
        class,
        id,
        properties,
        vector,
    })
}

// ---------------------------------------------------------------------------------------------
// GraphQL: just enough of the language for `{ Get { Class(args) { fields } } }`.

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Punct(char),
    Name(String),
    Number(f64),
    Text(String),
}

fn tokenize(query: &str) -> Result<Vec<Token>, String> {
    let mut tokens = Vec::new();
    let chars: Vec<char> = query.chars().collect();
    let mut index = 0;
    while index < chars.len() {
        let c = chars[index];
        if c.is_whitespace() || c == ',' {
            index += 1;
        } else if "{}()[]:".contains(c) {
            tokens.push(Token::Punct(c));
            index += 1;
        } else if c == '"' {
            let end = chars[index + 1..]
                .iter()
                .position(|&c| c == '"')
                .ok_or("Syntax Error: Unterminated string.")?;
            tokens.push(Token::Text(
                chars[index + 1..index + 1 + end].iter().collect(),
            ));
            index += end + 2;
        } else if c == '-' || c.is_ascii_digit() {
            let start = index;
            index += 1;
            while index < chars.len()
                && (chars[index].is_ascii_digit() || ".eE+-".contains(chars[index]))
            {
                index += 1;
            }
            let text: String = chars[start..index].iter().collect();
            let number = text
                .parse()
                .map_err(|_| format!("Syntax Error: Invalid number {text:?}."))?;
            tokens.push(Token::Number(number));
        } else if c == '_' || c.is_ascii_alphabetic() {
            let start = index;
            while index < chars.len()
                && (chars[index] == '_' || chars[index].is_ascii_alphanumeric())
            {
                index += 1;
            }
            tokens.push(Token::Name(chars[start..index].iter().collect()));
        } else {
            return Err(format!("Syntax Error: Unexpected character {c:?}."));
        }
    }
    Ok(tokens)
}

/// A GraphQL argument value.
#[derive(Debug, Clone, PartialEq)]
enum Argument {
    Number(f64),
    Text(String),
    Name(String),
    List(Vec<Argument>),
    Object(Vec<(String, Argument)>),
}

/// A field with its arguments and sub-selection.
#[derive(Debug, Clone, PartialEq)]
struct Field {
    name: String,
    arguments: Vec<(String, Argument)>,
    selection: Vec<Field>,
}

struct Parser {
    tokens: Vec<Token>,
    at: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.at)
    }

    fn next(&mut self) -> Result<Token, String> {
        let token = self
            .tokens
            .get(self.at)
            .cloned()
            .ok_or("Syntax Error: Unexpected <EOF>.")?;
        self.at += 1;
        Ok(token)
    }

    fn expect(&mut self, punct: char) -> Result<(), String> {
        match self.next()? {
            Token::Punct(found) if found == punct => Ok(()),
            other => Err(format!(
                "Syntax Error: Expected {punct:?}, found {other:?}."
            )),
        }
    }

    fn name(&mut self) -> Result<String, String> {
        match self.next()? {
            Token::Name(name) => Ok(name),
            other => Err(format!("Syntax Error: Expected Name, found {other:?}.")),
        }
    }

    fn value(&mut self) -> Result<Argument, String> {
        match self.next()? {
            Token::Number(number) => Ok(Argument::Number(number)),
            Token::Text(text) => Ok(Argument::Text(text)),
            Token::Name(name) => Ok(Argument::Name(name)),
            Token::Punct('[') => {
                let mut items = Vec::new();
                while self.peek() != Some(&Token::Punct(']')) {
                    items.push(self.value()?);
                }
                self.expect(']')?;
                Ok(Argument::List(items))
            }
            Token::Punct('{') => {
                let mut fields = Vec::new();
                while self.peek() != Some(&Token::Punct('}')) {
                    let name = self.name()?;
                    self.expect(':')?;
                    fields.push((name, self.value()?));
                }
                self.expect('}')?;
                Ok(Argument::Object(fields))
            }
            other => Err(format!("Syntax Error: Unexpected {other:?}.")),
        }
    }

    fn selection(&mut self) -> Result<Vec<Field>, String> {
        self.expect('{')?;
        let mut fields = Vec::new();
        while self.peek() != Some(&Token::Punct('}')) {
            let name = self.name()?;
            let mut arguments = Vec::new();
            if self.peek() == Some(&Token::Punct('(')) {
                self.next()?;
                while self.peek() != Some(&Token::Punct(')')) {
                    let argument = self.name()?;
                    self.expect(':')?;
                    arguments.push((argument, self.value()?));
                }
                self.expect(')')?;
            }
            let selection = if self.peek() == Some(&Token::Punct('{')) {
                self.selection()?
            } else {
                Vec::new()
            };
            fields.push(Field {
                name,
                arguments,
                selection,
            });
        }
        self.expect('}')?;
        Ok(fields)
    }
}

/// Parses a query document: an optional `query` keyword, then one selection set.
fn parse_query(query: &str) -> Result<Vec<Field>, String> {
    let mut parser = Parser {
        tokens: tokenize(query)?,
        at: 0,
    };
    if parser.peek() == Some(&Token::Name("query".into())) {
        parser.next()?;
    }
    let fields = parser.selection()?;
    match parser.peek() {
        None => Ok(fields),
        Some(token) => Err(format!("Syntax Error: Unexpected {token:?}.")),
    }
}

fn graphql_error(message: String) -> Value {
    json!({"errors": [{"message": message}], "data": null})
}

/// Answers a GraphQL query the way Weaviate's `Get` does.
fn graphql(classes: &[Value], objects: &[StoredObject], query: &str) -> Value {
    let fields = match parse_query(query) {
        Ok(fields) => fields,
        Err(message) => return graphql_error(message),
    };
    let mut data = serde_json::Map::new();
    for root in fields {
        if root.name != "Get" {
            return graphql_error(format!(
                "Cannot query field {:?} on type \"WeaviateObj\".",
                root.name
            ));
        }
        let mut get = serde_json::Map::new();
        for class_field in &root.selection {
            let Some(schema) = classes
                .iter()
                .find(|class| class["class"] == class_field.name.as_str())
            else {
                return graphql_error(format!(
                    "Cannot query field {:?} on type \"GetObjectsObj\".",
                    class_field.name
                ));
            };
            match get_class(schema, objects, class_field) {
                Ok(hits) => {
                    get.insert(class_field.name.clone(), hits);
                }
                Err(GetError::Validation(message)) => return graphql_error(message),
                Err(GetError::Execution(message)) => {
                    get.insert(class_field.name.clone(), Value::Null);
                    data.insert("Get".into(), Value::Object(get));
                    return json!({
                        "data": data,
                        "errors": [{"message": message, "path": ["Get", class_field.name]}],
                    });
                }
            }
        }
        data.insert("Get".into(), Value::Object(get));
    }
    json!({ "data": data })
}

enum GetError {
    /// The query does not fit the schema: the whole answer is `errors`, `data: null`.
    Validation(String),
    /// The query ran and failed: `errors`, and the class's hits are `null`.
    Execution(String),
}

/// The hits for one `Class(...) { ... }` field under `Get`.
fn get_class(schema: &Value, objects: &[StoredObject], field: &Field) -> Result<Value, GetError> {
    let class = field.name.as_str();
    let mut near_vector: Option<Vec<f64>> = None;
    let mut max_distance: Option<f64> = None;
    let mut limit = 10usize;
    for (name, value) in &field.arguments {
        match (name.as_str(), value) {
            ("nearVector", Argument::Object(options)) => {
                for (option, value) in options {
                    match (option.as_str(), value) {
                        ("vector", Argument::List(items)) => {
                            let numbers: Option<Vec<f64>> = items
                                .iter()
                                .map(|item| match item {
                                    Argument::Number(number) => Some(*number),
                                    _ => None,
                                })
                                .collect();
                            near_vector = Some(numbers.ok_or_else(|| {
                                GetError::Validation(
                                    "Argument \"nearVector\" has invalid value: vector holds a non-number.".into(),
                                )
                            })?);
                        }
                        ("distance", Argument::Number(number)) => max_distance = Some(*number),
                        ("certainty", Argument::Number(number)) => {
                            max_distance = Some(2.0 * (1.0 - number))
                        }
                        (other, _) => {
                            return Err(GetError::Validation(format!(
                                "Argument \"nearVector\" has invalid value: unknown field {other:?}."
                            )));
                        }
                    }
                }
            }
            ("limit", Argument::Number(number)) if *number >= 0.0 && number.fract() == 0.0 => {
                limit = *number as usize
            }
            (other, _) => {
                return Err(GetError::Validation(format!(
                    "Unknown argument {other:?} on field {class:?} of type \"GetObjectsObj\"."
                )));
            }
        }
    }
    let property_named = |name: &str| {
        schema["properties"].as_array().is_some_and(|list| {
            list.iter()
                .any(|property| property["name"].as_str() == Some(name))
        })
    };
    for selected in &field.selection {
        match selected.name.as_str() {
            "_additional" => {
                for additional in &selected.selection {
                    if !matches!(
                        additional.name.as_str(),
                        "id" | "distance" | "certainty" | "vector"
                    ) {
                        return Err(GetError::Validation(format!(
                            "Cannot query field {:?} on type \"{class}AdditionalProps\".",
                            additional.name
                        )));
                    }
                }
            }
            name if property_named(name) => {}
            name => {
                return Err(GetError::Validation(format!(
                    "Cannot query field {name:?} on type {class:?}."
                )));
            }
        }
    }
    let mut hits: Vec<(f64, &StoredObject)> = Vec::new();
    for object in objects.iter().filter(|object| object.class == class) {
        let distance = match (&near_vector, &object.vector) {
            (Some(query), Some(vector)) => {
                if query.len() != vector.len() {
                    return Err(GetError::Execution(format!(
                        "explorer: get class: vector search: knn search: distance between entrypoint and query node: vector lengths don't match: {} vs {}",
                        vector.len(),
                        query.len()
                    )));
                }
                cosine_distance(query, vector)
            }
            (Some(_), None) => continue,
            (None, _) => 0.0,
        };
        if max_distance.is_some_and(|max| distance > max) {
            continue;
        }
        hits.push((distance, object));
    }
    hits.sort_by(|a, b| a.0.total_cmp(&b.0).then_with(|| a.1.id.cmp(&b.1.id)));
    hits.truncate(limit);
    let answers: Vec<Value> = hits
        .into_iter()
        .map(|(distance, object)| {
            let mut hit = serde_json::Map::new();
            for selected in &field.selection {
                if selected.name == "_additional" {
                    let mut additional = serde_json::Map::new();
                    for wanted in &selected.selection {
                        let value = match wanted.name.as_str() {
                            "id" => Value::from(object.id.clone()),
                            "distance" if near_vector.is_some() => Value::from(distance),
                            "certainty" if near_vector.is_some() => {
                                Value::from(1.0 - distance / 2.0)
                            }
                            "vector" => json!(object.vector),
                            _ => Value::Null,
                        };
                        additional.insert(wanted.name.clone(), value);
                    }
                    hit.insert("_additional".into(), Value::Object(additional));
                } else {
                    hit.insert(
                        selected.name.clone(),
                        object
                            .properties
                            .get(&selected.name)
                            .cloned()
                            .unwrap_or(Value::Null),
                    );
                }
            }
            Value::Object(hit)
        })
        .collect();
    Ok(Value::from(answers))
}

/// Weaviate's cosine distance: `1 - cosine similarity`, in [0, 2].
fn cosine_distance(left: &[f64], right: &[f64]) -> f64 {
    let dot: f64 = left.iter().zip(right).map(|(a, b)| a * b).sum();
    let left_norm = left.iter().map(|a| a * a).sum::<f64>().sqrt();
    let right_norm = right.iter().map(|b| b * b).sum::<f64>().sqrt();
    if left_norm == 0.0 || right_norm == 0.0 {
        1.0
    } else {
        1.0 - dot / (left_norm * right_norm)
    }
}

fn serve(stream: TcpStream, state: &Mutex<State>) -> std::io::Result<()> {
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
        let (status, answer) = handle(&method, &path, &body, state);
        let reason = match status {
            200 => "OK",
            404 => "Not Found",
            500 => "Internal Server Error",
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
        let classes = Mutex::new(State::default());
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

    fn call(state: &Mutex<State>, method: &str, path: &str, body: &str) -> (u16, Value) {
        let (status, answer) = handle(method, path, body.as_bytes(), state);
        let value = if answer.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&answer).unwrap()
        };
        (status, value)
    }

    /// The message of the first GraphQL error of an answer.
    fn first_error(answer: &Value) -> &str {
        answer["errors"][0]["message"].as_str().unwrap_or_default()
    }

    /// A fake holding class `Doc` with one text property `label`.
    fn with_doc_class() -> Mutex<State> {
        let state = Mutex::new(State::default());
        let class = r#"{"class":"Doc","properties":[{"name":"label","dataType":["text"]}]}"#;
        assert_eq!(call(&state, "POST", "/v1/schema", class).0, 200);
        state
    }

    const ID: &str = "00000000-0000-4000-8000-00000000000A";

    #[test]
    fn objects_are_created_replaced_and_refused_like_weaviate() {
        let state = with_doc_class();
        let body =
            format!(r#"{{"class":"doc","id":"{ID}","properties":{{"Label":"a"}},"vector":[1,0]}}"#);
        let (status, object) = call(&state, "POST", "/v1/objects", &body);
        assert_eq!(status, 200, "{object}");
        assert_eq!(
            object["id"],
            ID.to_ascii_lowercase(),
            "ids are stored lower-case"
        );
        assert_eq!(object["class"], "Doc");
        assert_eq!(object["properties"], json!({"label": "a"}));
        let (status, answer) = call(&state, "POST", "/v1/objects", &body);
        assert_eq!(status, 422);
        assert_eq!(
            answer["error"][0]["message"],
            format!("id '{}' already exists", ID.to_ascii_lowercase())
        );

        let missing = "00000000-0000-4000-8000-0000000000ff";
        assert_eq!(
            handle(
                "PUT",
                &format!("/v1/objects/Doc/{missing}"),
                format!(r#"{{"class":"Doc","id":"{missing}"}}"#).as_bytes(),
                &state
            ),
            (404, Vec::new()),
            "PUT of an absent object: 404 with an empty body"
        );
        let (status, answer) = call(
            &state,
            "PUT",
            &format!("/v1/objects/Doc/{ID}"),
            &format!(r#"{{"class":"Doc","id":"{missing}"}}"#),
        );
        assert_eq!(
            (status, &answer["error"][0]["message"]),
            (422, &json!("invalid update: field 'id' is immutable"))
        );
        let (status, _) = call(
            &state,
            "PUT",
            &format!("/v1/objects/Doc/{ID}"),
            &format!(
                r#"{{"class":"Doc","id":"{ID}","properties":{{"label":"b"}},"vector":[0,1]}}"#
            ),
        );
        assert_eq!(status, 200);
        let (status, object) = call(&state, "GET", &format!("/v1/objects/Doc/{ID}"), "");
        assert_eq!(status, 200);
        assert_eq!(
            object["properties"]["label"], "b",
            "PUT replaced the properties"
        );
        assert_eq!(object["vector"], json!([0.0, 1.0]));

        for (body, status, message) in [
            (
                r#"{"class":"Nope","id":"00000000-0000-4000-8000-000000000001"}"#,
                422,
                "class \"Nope\" not found in schema",
            ),
            (
                r#"{"class":"Doc","id":"12"}"#,
                422,
                "invalid UUID length: 2",
            ),
            (
                r#"{"class":"Doc","id":"00000000-0000-4000-8000-000000000001","properties":{"pages":3}}"#,
                422,
                "no such prop with name 'pages'",
            ),
            (
                r#"{"class":"Doc","id":"00000000-0000-4000-8000-000000000001","properties":{"label":3}}"#,
                422,
                "invalid text property 'label'",
            ),
            (
                r#"{"class":"Doc","id":"00000000-0000-4000-8000-000000000001","vector":[1,0,0]}"#,
                500,
                "new node has a vector with length 3. Existing nodes have vectors with length 2",
            ),
        ] {
            let (found, answer) = call(&state, "POST", "/v1/objects", body);
            assert_eq!(found, status, "{body}: {answer}");
            let text = answer["error"][0]["message"].as_str().unwrap();
            assert!(text.contains(message), "{body}: {text}");
        }
    }

    #[test]
    fn graphql_get_near_vector_answers_in_weaviates_shape() {
        let state = with_doc_class();
        for (id, vector, label) in [
            ("00000000-0000-4000-8000-000000000001", "[1,0]", "east"),
            ("00000000-0000-4000-8000-000000000002", "[0,1]", "north"),
            ("00000000-0000-4000-8000-000000000003", "[-1,0]", "west"),
        ] {
            let body = format!(
                r#"{{"class":"Doc","id":"{id}","properties":{{"label":"{label}"}},"vector":{vector}}}"#
            );
            assert_eq!(call(&state, "POST", "/v1/objects", &body).0, 200);
        }
        let query = |text: &str| {
            call(
                &state,
                "POST",
                "/v1/graphql",
                &json!({"query": text}).to_string(),
            )
        };

        let (status, answer) = query(
            "{ Get { Doc(nearVector: {vector: [1, 0.0]}, limit: 2) { label _additional { id distance certainty } } } }",
        );
        assert_eq!(status, 200);
        assert_eq!(
            answer,
            json!({"data": {"Get": {"Doc": [
                {"label": "east", "_additional": {"id": "00000000-0000-4000-8000-000000000001", "distance": 0.0, "certainty": 1.0}},
                {"label": "north", "_additional": {"id": "00000000-0000-4000-8000-000000000002", "distance": 1.0, "certainty": 0.5}},
            ]}}})
        );
        let (_, answer) = query(
            "{ Get { Doc(nearVector: {vector: [-1, 0]}, limit: 1) { _additional { id } } } }",
        );
        assert_eq!(
            answer["data"]["Get"]["Doc"][0]["_additional"]["id"],
            "00000000-0000-4000-8000-000000000003"
        );
        let (_, answer) = query("{ Get { Doc(nearVector: {vector: [1, 0]}) { label } } }");
        assert_eq!(answer["data"]["Get"]["Doc"].as_array().unwrap().len(), 3);

        let (status, answer) =
            query("{ Get { Other(nearVector: {vector: [1, 0]}) { _additional { id } } } }");
        assert_eq!(status, 200, "GraphQL errors come with 200");
        assert_eq!(
            answer,
            json!({"errors": [{"message": "Cannot query field \"Other\" on type \"GetObjectsObj\"."}], "data": null})
        );
        let (_, answer) = query("{ Get { Doc { pages } } }");
        assert_eq!(
            answer["errors"][0]["message"],
            "Cannot query field \"pages\" on type \"Doc\"."
        );
        let (_, answer) = query("{ Get { Doc(near: 1) { label } } }");
        assert!(
            first_error(&answer).starts_with("Unknown argument \"near\""),
            "{answer}"
        );
        let (_, answer) = query("{ Get { Doc(nearVector: {vector: [1, 0, 0]}) { label } } }");
        assert_eq!(answer["data"]["Get"]["Doc"], Value::Null);
        assert!(
            first_error(&answer).contains("vector lengths don't match"),
            "{answer}"
        );
        let (_, answer) = query("{ Get { Doc(");
        assert!(first_error(&answer).starts_with("Syntax Error"), "{answer}");
    }
}
