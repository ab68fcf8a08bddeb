//! Registered baselines, one per image: the authority on what "not drifted" means. Only the
//! pipeline token can write them. Where they are kept is a [`BaselineStore`]: the embedded
//! one is `<data-dir>/baselines/` (fsync + rename, so they survive a restart); under
//! `--fleet-store postgres://…` it is PostgreSQL (`pgstore::caches::PgBaselines`), so an
//! image registered through one collector is judged alike by all. Either way every
//! collector reads its own copy in memory: a report never waits for a store.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use phoenix_wire::drift::Manifest;

use crate::drift::{check_registration, Registration};

/// Where baselines persist.
pub trait BaselineStore: Send + Sync + std::fmt::Debug {
    /// Every stored baseline (at start).
    fn load(&self) -> Result<Vec<Manifest>, String>;
    /// Stores `m`, already checked, and says what that did to what was stored. `here` is
    /// what this collector's copy says it does; a shared store answers for the cluster.
    fn put(&self, image: &str, m: &Manifest, here: Registration) -> Result<Registration, String>;
    /// Baselines stored through other collectors since the last call; asked at every read,
    /// so it must be cheap when there are none.
    fn changed(&self) -> Vec<Manifest> {
        Vec::new()
    }
}

fn file_name(image: &str) -> String {
    // Image ids may hold '/', which cannot be in a file name.
    format!("{}.json", image.replace('%', "%25").replace('/', "%2F"))
}

/// `<data-dir>/baselines/`, one JSON file per image.
#[derive(Debug)]
pub struct FileBaselines {
    dir: PathBuf,
}

impl FileBaselines {
    pub fn open(dir: &Path) -> std::io::Result<FileBaselines> {
        std::fs::create_dir_all(dir)?;
        Ok(FileBaselines {
            dir: dir.to_path_buf(),
        })
    }
}

impl BaselineStore for FileBaselines {
    fn load(&self) -> Result<Vec<Manifest>, String> {
        let mut out = Vec::new();
        let rd = std::fs::read_dir(&self.dir)
            .map_err(|e| format!("reading {}: {e}", self.dir.display()))?;
        for e in rd.flatten() {
            if e.path().extension().is_some_and(|x| x == "json") {
                match std::fs::read(e.path())
                    .ok()
                    .and_then(|b| serde_json::from_slice::<Manifest>(&b).ok())
                {
                    Some(m) if m.verify().is_ok() => out.push(m),
                    _ => {
                        tracing::warn!(file = %e.path().display(), "ignoring an unreadable or inconsistent baseline file")
                    }
                }
            }
        }
        Ok(out)
    }

    fn put(&self, image: &str, m: &Manifest, here: Registration) -> Result<Registration, String> {
        if here == Registration::Unchanged {
            return Ok(here);
        }
        let path = self.dir.join(file_name(image));
        let tmp = self.dir.join(format!(".tmp-{}", file_name(image)));
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&serde_json::to_vec(m).map_err(std::io::Error::other)?)?;
            f.sync_data()?;
            std::fs::rename(&tmp, &path)?;
            std::fs::File::open(&self.dir)?.sync_all()
        };
        write().map_err(|e| format!("storing the baseline in {}: {e}", self.dir.display()))?;
        Ok(here)
    }
}

#[derive(Debug)]
pub struct Baselines {
    store: Box<dyn BaselineStore>,
    map: RwLock<HashMap<String, Arc<Manifest>>>,
    /// One registration at a time through this collector (the store is asked without the
    /// map's lock held, so reports keep reading meanwhile).
    writing: Mutex<()>,
}

impl Baselines {
    /// The embedded store in `dir`.
    pub fn open(dir: &Path) -> std::io::Result<Baselines> {
        let store = FileBaselines::open(dir)?;
        Baselines::with_store(Box::new(store)).map_err(std::io::Error::other)
    }

    /// Everything `store` holds, loaded now.
    pub fn with_store(store: Box<dyn BaselineStore>) -> Result<Baselines, String> {
        let map = store
            .load()?
            .into_iter()
            .map(|m| (m.image_id.clone(), Arc::new(m)))
            .collect();
        Ok(Baselines {
            store,
            map: RwLock::new(map),
            writing: Mutex::new(()),
        })
    }

    fn refresh(&self) {
        let news = self.store.changed();
        if news.is_empty() {
            return;
        }
        let mut g = self.map.write().unwrap();
        for m in news {
            g.insert(m.image_id.clone(), Arc::new(m));
        }
    }

    pub fn get(&self, image: &str) -> Option<Arc<Manifest>> {
        self.refresh();
        self.map.read().unwrap().get(image).cloned()
    }

    pub fn len(&self) -> usize {
        self.refresh();
        self.map.read().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Check and store a manifest posted for `image`.
    pub fn register(&self, image: &str, m: Manifest) -> Result<Registration, String> {
        let _one = self.writing.lock().unwrap();
        self.refresh();
        let here = {
            let g = self.map.read().unwrap();
            check_registration(image, &m, g.get(image).map(|a| a.as_ref()))?
        };
        let outcome = self.store.put(image, &m, here)?;
        self.map
            .write()
            .unwrap()
            .insert(image.to_string(), Arc::new(m));
        Ok(outcome)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default)]
    struct Elsewhere(Mutex<Vec<Manifest>>);

    impl BaselineStore for Arc<Elsewhere> {
        fn load(&self) -> Result<Vec<Manifest>, String> {
            Ok(Vec::new())
        }
        fn put(&self, _: &str, _: &Manifest, here: Registration) -> Result<Registration, String> {
            Ok(here)
        }
        fn changed(&self) -> Vec<Manifest> {
            std::mem::take(&mut *self.0.lock().unwrap())
        }
    }

    fn manifest(image: &str) -> Manifest {
        let m = Manifest {
            version: phoenix_wire::drift::MANIFEST_VERSION,
            hash_version: phoenix_wire::drift::HASH_VERSION,
            image_id: image.into(),
            created: "2026-01-01T00:00:00Z".into(),
            paths: vec!["/etc".into()],
            excludes: Vec::new(),
            root: phoenix_wire::drift::root_of_entries(&[]),
            entries: Vec::new(),
        };
        m.verify().unwrap();
        m
    }

    #[test]
    fn files_survive_a_reopen_and_others_registrations_are_read() {
        let d = tempfile::tempdir().unwrap();
        let b = Baselines::open(d.path()).unwrap();
        assert_eq!(
            b.register("img-1", manifest("img-1")).unwrap(),
            Registration::Created
        );
        assert_eq!(
            b.register("img-1", manifest("img-1")).unwrap(),
            Registration::Unchanged
        );
        assert!(b.register("img-2", manifest("img-1")).is_err());
        let again = Baselines::open(d.path()).unwrap();
        assert_eq!(again.len(), 1);
        assert!(again.get("img-1").is_some());

        let elsewhere = Arc::new(Elsewhere::default());
        let shared = Baselines::with_store(Box::new(elsewhere.clone())).unwrap();
        assert!(shared.get("img-9").is_none());
        elsewhere.0.lock().unwrap().push(manifest("img-9"));
        assert!(shared.get("img-9").is_some(), "registered elsewhere");
    }
}
