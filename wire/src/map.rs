//! [`Map`]: a point's tags and fields, a few entries sorted by key in one `Vec`.
//!
//! A point has a handful of tags and fields. In a `BTreeMap` each map is a node of room for
//! eleven entries (about 600 bytes for `String` keys and [`crate::Value`]s), every insert
//! searches it with string compares, and dropping it walks the tree: by callgrind the maps of
//! a 40-point report's 80 were about a tenth of the collector's instructions for it, half of
//! that in the drop alone. Here they are one exact `Vec` each. Agents serialise their maps
//! sorted, so a decoded entry is almost always appended after one compare with the last.
//!
//! What it keeps of `BTreeMap`: entries sorted by key, one per key (a later insert replaces
//! the value, as a later duplicate JSON key does), iteration in key order, equality of
//! contents, and serde as a JSON object. Lookups are a binary search; the maps are small.

use std::fmt;
use std::ops::Index;

use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Entries sorted by key, keys unique.
#[derive(Clone, PartialEq, Eq)]
pub struct Map<V>(Vec<(String, V)>);

/// Borrowed entries in key order, as `BTreeMap::iter` gives them.
pub type Iter<'a, V> =
    std::iter::Map<std::slice::Iter<'a, (String, V)>, fn(&'a (String, V)) -> (&'a String, &'a V)>;

impl<V> Map<V> {
    pub const fn new() -> Map<V> {
        Map(Vec::new())
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Where `key` is, or where it would go.
    fn find(&self, key: &str) -> Result<usize, usize> {
        // Appends in order are the common case (decode, and agents building points).
        match self.0.last() {
            None => Err(0),
            Some((last, _)) if last.as_str() < key => Err(self.0.len()),
            _ => self.0.binary_search_by(|(k, _)| k.as_str().cmp(key)),
        }
    }

    pub fn get(&self, key: &str) -> Option<&V> {
        self.find(key).ok().map(|i| &self.0[i].1)
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.find(key).is_ok()
    }

    /// Sets `key` to `value`; the value it had, if any.
    pub fn insert(&mut self, key: String, value: V) -> Option<V> {
        match self.find(&key) {
            Ok(i) => Some(std::mem::replace(&mut self.0[i].1, value)),
            Err(i) => {
                self.0.insert(i, (key, value));
                None
            }
        }
    }

    pub fn remove(&mut self, key: &str) -> Option<V> {
        self.find(key).ok().map(|i| self.0.remove(i).1)
    }

    pub fn retain(&mut self, mut keep: impl FnMut(&String, &mut V) -> bool) {
        self.0.retain_mut(|(k, v)| keep(k, v));
    }

    pub fn iter(&self) -> Iter<'_, V> {
        self.0.iter().map(|(k, v)| (k, v))
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&String, &mut V)> {
        self.0.iter_mut().map(|(k, v)| (&*k, v))
    }

    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.0.iter().map(|(k, _)| k)
    }
}

impl<V> Default for Map<V> {
    fn default() -> Map<V> {
        Map::new()
    }
}

impl<V> FromIterator<(String, V)> for Map<V> {
    fn from_iter<I: IntoIterator<Item = (String, V)>>(it: I) -> Map<V> {
        let mut m = Map::new();
        m.extend(it);
        m
    }
}

impl<V> Extend<(String, V)> for Map<V> {
    fn extend<I: IntoIterator<Item = (String, V)>>(&mut self, it: I) {
        for (k, v) in it {
            self.insert(k, v);
        }
    }
}

impl<V, const N: usize> From<[(String, V); N]> for Map<V> {
    fn from(entries: [(String, V); N]) -> Map<V> {
        entries.into_iter().collect()
    }
}

impl<'a, V> IntoIterator for &'a Map<V> {
    type Item = (&'a String, &'a V);
    type IntoIter = Iter<'a, V>;
    fn into_iter(self) -> Iter<'a, V> {
        self.iter()
    }
}

/// Panics when `key` is absent, as `BTreeMap`'s does: for tests and known keys only.
impl<V> Index<&str> for Map<V> {
    type Output = V;
    fn index(&self, key: &str) -> &V {
        self.get(key).expect("no entry for this key in the map")
    }
}

impl<V: fmt::Debug> fmt::Debug for Map<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl<V: Serialize> Serialize for Map<V> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for Map<V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Map<V>, D::Error> {
        struct Entries<V>(std::marker::PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for Entries<V> {
            type Value = Map<V>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Map<V>, A::Error> {
                // An empty object allocates nothing; otherwise room for eight at once. JSON
                // gives no count to size it by, and `Vec`'s own growth (4, 8, 16) reallocated
                // twice for a cpu point's ten fields (callgrind: 5 % of a 40-point report).
                let Some(first) = a.next_entry::<String, V>()? else {
                    return Ok(Map::new());
                };
                let mut entries = Vec::with_capacity(8);
                entries.push(first);
                let mut m = Map(entries);
                while let Some((k, v)) = a.next_entry::<String, V>()? {
                    m.insert(k, v);
                }
                Ok(m)
            }
        }
        d.deserialize_map(Entries(std::marker::PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    #[derive(Debug, Clone)]
    enum Op {
        Insert(String, u8),
        Remove(String),
        Retain(u8),
    }

    fn key() -> impl Strategy<Value = String> {
        "[a-e]{0,3}"
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (key(), any::<u8>()).prop_map(|(k, v)| Op::Insert(k, v)),
            1 => key().prop_map(Op::Remove),
            1 => any::<u8>().prop_map(Op::Retain),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]
        /// Any sequence of edits leaves the same entries, in the same order, as a BTreeMap.
        #[test]
        fn behaves_as_a_btreemap(ops in proptest::collection::vec(op(), 0..40), probe in key()) {
            let mut m = Map::new();
            let mut b = BTreeMap::new();
            for o in ops {
                match o {
                    Op::Insert(k, v) => prop_assert_eq!(m.insert(k.clone(), v), b.insert(k, v)),
                    Op::Remove(k) => prop_assert_eq!(m.remove(&k), b.remove(&k)),
                    Op::Retain(x) => {
                        m.retain(|_, v| *v > x);
                        b.retain(|_, v| *v > x);
                    }
                }
                prop_assert_eq!(m.iter().collect::<Vec<_>>(), b.iter().collect::<Vec<_>>());
            }
            prop_assert_eq!(m.get(&probe), b.get(&probe));
            prop_assert_eq!(m.contains_key(&probe), b.contains_key(&probe));
            prop_assert_eq!(m.len(), b.len());
        }

        /// A JSON object reads as a BTreeMap reads it, duplicates and any order included, and
        /// writes back as the BTreeMap writes.
        #[test]
        fn json_as_a_btreemap(entries in proptest::collection::vec((key(), any::<i32>()), 0..12)) {
            let body = format!(
                "{{{}}}",
                entries.iter().map(|(k, v)| format!("{k:?}:{v}")).collect::<Vec<_>>().join(",")
            );
            let m: Map<i32> = serde_json::from_str(&body).unwrap();
            let b: BTreeMap<String, i32> = serde_json::from_str(&body).unwrap();
            prop_assert_eq!(m.iter().collect::<Vec<_>>(), b.iter().collect::<Vec<_>>());
            prop_assert_eq!(serde_json::to_string(&m).unwrap(), serde_json::to_string(&b).unwrap());
            let back: Map<i32> = serde_json::from_str(&serde_json::to_string(&m).unwrap()).unwrap();
            prop_assert_eq!(back, m);
        }
    }

    #[test]
    fn not_an_object_is_an_error() {
        for bad in ["[]", "1", "\"x\"", "{\"a\":}", "{1:2}"] {
            assert!(serde_json::from_str::<Map<i32>>(bad).is_err(), "{bad}");
        }
    }
}
