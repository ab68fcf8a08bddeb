//! Bearer tokens by role. Each role's tokens are accepted only where that role may act;
//! several per role allow rotation; comparison is constant-time; token values are never
//! logged or echoed, only the name given to them.

use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    Agent,
    Pipeline,
    Recycler,
    Reader,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Agent, Role::Pipeline, Role::Recycler, Role::Reader];

    pub fn name(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Pipeline => "pipeline",
            Role::Recycler => "recycler",
            Role::Reader => "reader",
        }
    }
}

#[derive(Clone)]
struct Token {
    role: Role,
    /// A label safe to log: the role and the token's position, e.g. `agent#2`.
    name: String,
    secret: Vec<u8>,
}

/// Never prints the secret: a token in a log line is a leaked token.
impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("role", &self.role)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Default)]
pub struct Tokens {
    tokens: Vec<Token>,
}

/// Who made a request, as far as logs and the audit trail are concerned.
#[derive(Debug, Clone, PartialEq)]
pub struct Caller {
    pub role: Role,
    pub token_name: String,
}

impl Tokens {
    pub fn add(&mut self, role: Role, secret: &str) {
        let n = self.tokens.iter().filter(|t| t.role == role).count() + 1;
        self.tokens.push(Token {
            role,
            name: format!("{}#{n}", role.name()),
            secret: secret.trim().as_bytes().to_vec(),
        });
    }

    pub fn has(&self, role: Role) -> bool {
        self.tokens.iter().any(|t| t.role == role)
    }

    /// The caller whose token matches `presented` among the roles in `allowed`.
    pub fn check(&self, presented: Option<&str>, allowed: &[Role]) -> Option<Caller> {
        let presented = presented?.as_bytes();
        let mut found = None;
        // Compare against every token, so timing does not reveal which role or position matched.
        for t in &self.tokens {
            if ct_eq(&t.secret, presented) && found.is_none() {
                found = Some(t);
            }
        }
        let t = found?;
        allowed.contains(&t.role).then(|| Caller {
            role: t.role,
            token_name: t.name.clone(),
        })
    }
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    // Lengths are not secret; contents are compared without an early exit.
    if a.len() != b.len() || a.is_empty() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `Authorization: Bearer T` (or `Token T`, as InfluxDB clients send).
pub fn bearer(h: Option<&str>) -> Option<&str> {
    let h = h?.trim();
    h.strip_prefix("Bearer ")
        .or_else(|| h.strip_prefix("Token "))
        .map(str::trim)
}

/// A fresh random token from the kernel.
pub fn generate() -> std::io::Result<String> {
    use std::io::Read;
    let mut b = [0u8; 24];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// Read a token file, refusing ones that others can read.
pub fn read_token_file(path: &Path) -> std::io::Result<String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path)?;
    if meta.permissions().mode() & 0o077 != 0 {
        tracing::warn!(file = %path.display(), "token file is readable by group or others; chmod 600 it");
    }
    Ok(std::fs::read_to_string(path)?.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_are_kept_apart() {
        let mut t = Tokens::default();
        t.add(Role::Agent, "a1");
        t.add(Role::Agent, "a2");
        t.add(Role::Recycler, "r1");
        assert_eq!(
            t.check(Some("a2"), &[Role::Agent]).unwrap().token_name,
            "agent#2"
        );
        assert!(t.check(Some("a1"), &[Role::Recycler]).is_none());
        assert!(t.check(Some("r1"), &[Role::Agent]).is_none());
        assert!(t
            .check(Some("nope"), &[Role::Agent, Role::Recycler])
            .is_none());
        assert!(t.check(Some(""), &[Role::Agent]).is_none());
        assert!(t.check(None, &[Role::Agent]).is_none());
        assert_eq!(bearer(Some("Bearer abc ")), Some("abc"));
        assert_eq!(bearer(Some("Basic abc")), None);
    }
}
