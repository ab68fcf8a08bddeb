//! Registered baselines, one per image: the authority on what "not drifted" means. Kept in
//! `<data-dir>/baselines/` (fsync + rename) so they survive a restart; only the pipeline
//! token can write them.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use phoenix_wire::drift::Manifest;

use crate::drift::{check_registration, Registration};

#[derive(Debug)]
pub struct Baselines {
    dir: PathBuf,
    map: RwLock<HashMap<String, Arc<Manifest>>>,
}

fn file_name(image: &str) -> String {
    // Image ids may hold '/', which cannot be in a file name.
    format!("{}.json", image.replace('%', "%25").replace('/', "%2F"))
}

impl Baselines {
    pub fn open(dir: &Path) -> std::io::Result<Baselines> {
        std::fs::create_dir_all(dir)?;
        let mut map = HashMap::new();
        for e in std::fs::read_dir(dir)?.flatten() {
            if e.path().extension().is_some_and(|x| x == "json") {
                match std::fs::read(e.path())
                    .ok()
                    .and_then(|b| serde_json::from_slice::<Manifest>(&b).ok())
                {
                    Some(m) if m.verify().is_ok() => {
                        map.insert(m.image_id.clone(), Arc::new(m));
                    }
                    _ => {
                        tracing::warn!(file = %e.path().display(), "ignoring an unreadable or inconsistent baseline file")
                    }
                }
            }
        }
        Ok(Baselines {
            dir: dir.to_path_buf(),
            map: RwLock::new(map),
        })
    }

    pub fn get(&self, image: &str) -> Option<Arc<Manifest>> {
        self.map.read().unwrap().get(image).cloned()
    }

    pub fn len(&self) -> usize {
        self.map.read().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Check and store a manifest posted for `image`.
    pub fn register(&self, image: &str, m: Manifest) -> Result<Registration, String> {
        let mut g = self.map.write().unwrap();
        let outcome = check_registration(image, &m, g.get(image).map(|a| a.as_ref()))?;
        if outcome != Registration::Unchanged {
            let path = self.dir.join(file_name(image));
            let tmp = self.dir.join(format!(".tmp-{}", file_name(image)));
            let write = || -> std::io::Result<()> {
                let mut f = std::fs::File::create(&tmp)?;
                f.write_all(&serde_json::to_vec(&m).map_err(std::io::Error::other)?)?;
                f.sync_data()?;
                std::fs::rename(&tmp, &path)?;
                std::fs::File::open(&self.dir)?.sync_all()
            };
            write().map_err(|e| format!("storing the baseline in {}: {e}", self.dir.display()))?;
            g.insert(image.to_string(), Arc::new(m));
        }
        Ok(outcome)
    }
}
