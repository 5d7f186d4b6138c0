//! Default VectorIndex adapter: classes and properties in memory, object upsert and brute-force
//! k-nearest by cosine similarity (C4, C5). Names follow Weaviate's rules (see `ports`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use outpost_proto::profile::{IndexClassSpec, PropertySpec};

use super::ports::{
    AdapterIdentity, AdapterKind, ClassState, IdempotencyKey, Neighbour, PortError, VectorIndex,
    normalize_class, normalize_class_name, normalize_data_type, normalize_object_id,
    normalize_property_name, same_name,
};

/// Most objects one in-memory class holds.
pub const CLASS_OBJECTS_MAX: usize = 100_000;

#[derive(Debug, Clone)]
struct StoredObject {
    vector: Vec<f32>,
    properties: BTreeMap<String, String>,
}

#[derive(Debug, Clone)]
struct ClassEntry {
    state: ClassState,
    objects: BTreeMap<String, StoredObject>,
}

/// A handle on one in-memory index; clones share it.
#[derive(Debug, Clone, Default)]
pub struct InMemoryIndex {
    classes: Arc<Mutex<BTreeMap<String, ClassEntry>>>,
}

impl InMemoryIndex {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, ClassEntry>> {
        self.classes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn find_class<'a>(
    classes: &'a mut BTreeMap<String, ClassEntry>,
    class: &str,
) -> Option<&'a mut ClassEntry> {
    classes
        .iter_mut()
        .find(|(name, _)| same_name(name, class))
        .map(|(_, entry)| entry)
}

/// Cosine similarity; 0 when either vector has no length.
pub fn cosine_similarity(left: &[f32], right: &[f32]) -> f32 {
    let dot: f32 = left.iter().zip(right).map(|(a, b)| a * b).sum();
    let left_norm: f32 = left.iter().map(|a| a * a).sum::<f32>().sqrt();
    let right_norm: f32 = right.iter().map(|b| b * b).sum::<f32>().sqrt();
    if left_norm == 0.0 || right_norm == 0.0 {
        0.0
    } else {
        dot / (left_norm * right_norm)
    }
}

impl VectorIndex for InMemoryIndex {
    fn identity(&self) -> AdapterIdentity {
        AdapterIdentity {
            kind: AdapterKind::InMemory,
            location: "in-memory".into(),
        }
    }

    fn read_class(&mut self, class: &str) -> Result<Option<ClassState>, PortError> {
        Ok(find_class(&mut self.lock(), class).map(|entry| entry.state.clone()))
    }

    fn create_class(
        &mut self,
        class: &IndexClassSpec,
        _key: &IdempotencyKey,
    ) -> Result<(), PortError> {
        let class = normalize_class(class);
        let mut classes = self.lock();
        if find_class(&mut classes, &class.name).is_some() {
            return Err(PortError::refused(
                "create class",
                class.name.as_str(),
                format!("class name {:?} already exists", class.name),
            ));
        }
        let state = ClassState {
            name: class.name.clone(),
            properties: class.properties,
        };
        classes.insert(
            class.name,
            ClassEntry {
                state,
                objects: BTreeMap::new(),
            },
        );
        Ok(())
    }

    fn add_property(
        &mut self,
        class: &str,
        property: &PropertySpec,
        _key: &IdempotencyKey,
    ) -> Result<(), PortError> {
        let mut classes = self.lock();
        let target = format!("{class}.{}", property.name);
        let Some(entry) = find_class(&mut classes, class) else {
            return Err(PortError::refused("add property", target, "no such class"));
        };
        if entry
            .state
            .properties
            .iter()
            .any(|existing| same_name(&existing.name, &property.name))
        {
            return Err(PortError::refused(
                "add property",
                target,
                "property already exists",
            ));
        }
        entry.state.properties.push(PropertySpec {
            name: normalize_property_name(&property.name),
            data_type: normalize_data_type(&property.data_type),
        });
        Ok(())
    }

    fn retype_property(
        &mut self,
        class: &str,
        property: &PropertySpec,
        _key: &IdempotencyKey,
    ) -> Result<(), PortError> {
        let mut classes = self.lock();
        let target = format!("{class}.{}", property.name);
        let Some(entry) = find_class(&mut classes, class) else {
            return Err(PortError::refused(
                "retype property",
                target,
                "no such class",
            ));
        };
        let Some(existing) = entry
            .state
            .properties
            .iter_mut()
            .find(|existing| same_name(&existing.name, &property.name))
        else {
            return Err(PortError::refused(
                "retype property",
                target,
                "no such property",
            ));
        };
        existing.data_type = normalize_data_type(&property.data_type);
        let name = existing.name.clone();
        for object in entry.objects.values_mut() {
            object.properties.retain(|key, _| !same_name(key, &name));
        }
        Ok(())
    }

    fn upsert(
        &mut self,
        class: &str,
        id: &str,
        vector: &[f32],
        properties: &BTreeMap<String, String>,
        _key: &IdempotencyKey,
    ) -> Result<(), PortError> {
        let id = normalize_object_id("upsert object", &normalize_class_name(class), id)?;
        let id = id.as_str();
        let mut classes = self.lock();
        let target = format!("{}/{id}", normalize_class_name(class));
        let Some(entry) = find_class(&mut classes, class) else {
            return Err(PortError::refused("upsert object", target, "no such class"));
        };
        if let Some(unknown) = properties.keys().find(|key| {
            !entry
                .state
                .properties
                .iter()
                .any(|property| same_name(&property.name, key))
        }) {
            return Err(PortError::refused(
                "upsert object",
                target,
                format!("no property {unknown:?} in the class"),
            ));
        }
        let held_dimensions = entry
            .objects
            .values()
            .next()
            .map(|object| object.vector.len());
        if let Some(dimensions) = held_dimensions
            && dimensions != vector.len()
        {
            return Err(PortError::refused(
                "upsert object",
                target,
                format!(
                    "vector has {} dimensions, the class holds {dimensions}",
                    vector.len()
                ),
            ));
        }
        if entry.objects.len() >= CLASS_OBJECTS_MAX && !entry.objects.contains_key(id) {
            return Err(PortError::refused(
                "upsert object",
                target,
                format!("class holds {CLASS_OBJECTS_MAX} objects"),
            ));
        }
        let properties = properties
            .iter()
            .map(|(key, value)| (normalize_property_name(key), value.clone()))
            .collect();
        entry.objects.insert(
            id.to_string(),
            StoredObject {
                vector: vector.to_vec(),
                properties,
            },
        );
        Ok(())
    }

    fn nearest(
        &mut self,
        class: &str,
        vector: &[f32],
        limit: usize,
    ) -> Result<Vec<Neighbour>, PortError> {
        let mut classes = self.lock();
        let Some(entry) = find_class(&mut classes, class) else {
            return Err(PortError::refused("nearest", class, "no such class"));
        };
        let mut hits: Vec<Neighbour> = entry
            .objects
            .iter()
            .map(|(id, object)| Neighbour {
                id: id.clone(),
                score: cosine_similarity(vector, &object.vector),
            })
            .collect();
        hits.sort_by(|a, b| b.score.total_cmp(&a.score).then_with(|| a.id.cmp(&b.id)));
        hits.truncate(limit);
        Ok(hits)
    }
}
