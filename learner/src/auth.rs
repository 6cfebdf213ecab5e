//! Who may use the learner's UI and API: roles, usernames, password hashes (argon2id),
//! session and API tokens, CSRF tokens and one-time passwords.
//!
//! Everything here is pure except drawing randomness, which comes from the operating
//! system ([`SysRng`]: no user-space generator whose state a fork or a VM snapshot could
//! duplicate). Each generator has a twin taking the random bytes or the generator, so
//! tests are deterministic. Storage (users, sessions, tokens, their audit entries) is
//! [`crate::store`]; nothing here does I/O.
//!
//! What is stored, and what never is:
//! * passwords only as argon2id PHC strings ([`PasswordHash`]), never in clear, and there
//!   is no default password: the first admin and every reset get a
//!   [`one_time_password`] that must be changed;
//! * session and API tokens only as their SHA-256 ([`token_digest`]): a copy of the
//!   database lets nobody log in. The token itself is shown once;
//! * the per-session CSRF secret is stored; forms carry a masked token derived from it
//!   ([`CsrfSecret::token`]), a fresh mask each time, so a compressed page never repeats
//!   the secret's bytes (BREACH).

use std::fmt;
use std::str::FromStr;
use std::sync::LazyLock;

use argon2::{Algorithm, Argon2, Params, PasswordHasher, PasswordVerifier, Version};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::rngs::SysRng;
use rand::{TryCryptoRng, TryRng};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Shortest accepted password, in characters.
pub const MIN_PASSWORD_CHARS: usize = 12;
/// Longest accepted password, in bytes (what argon2 is fed; bounds the work a login costs).
pub const MAX_PASSWORD_BYTES: usize = 1024;
/// Longest username, in characters.
pub const MAX_USERNAME_CHARS: usize = 64;
/// Random bytes in a session or API token and in a CSRF secret.
pub const TOKEN_BYTES: usize = 32;
/// Characters of a generated one-time password.
pub const ONE_TIME_PASSWORD_CHARS: usize = 24;
/// What every API token starts with, so secret scanners and people recognise one.
pub const API_TOKEN_PREFIX: &str = "bht_";
/// Longest token string worth hashing; anything longer is no token of ours.
pub const MAX_TOKEN_CHARS: usize = 128;

/// argon2id with the OWASP Password Storage Cheat Sheet's first recommendation:
/// 19 MiB of memory, 2 passes, 1 lane. Checked at compile time.
const ARGON2_PARAMS: Params = match Params::new(19 * 1024, 2, 1, None) {
    Ok(p) => p,
    Err(_) => panic!("invalid argon2 parameters"),
};
/// Salt bytes (argon2's recommendation).
const SALT_BYTES: usize = 16;
/// A stored hash asking for more than this is refused unverified: the parameters come
/// from the database, and a tampered row must not make one login allocate gigabytes.
const MAX_VERIFY_M_COST_KIB: u32 = 256 * 1024;
const MAX_VERIFY_T_COST: u32 = 16;
const MAX_VERIFY_P_COST: u32 = 8;

/// One-time password alphabet: letters and digits without look-alikes (0/o/O, 1/l/I).
/// 56 symbols × 24 characters ≈ 139 bits.
const OTP_ALPHABET: &[u8] = b"23456789abcdefghijkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ";
const _: () = assert!(OTP_ALPHABET.len() == 56);

/// Everything that can go wrong here.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("unknown role {given:?}: expected viewer, analyst, approver or admin")]
    UnknownRole { given: String },

    #[error("invalid username: {problem}")]
    InvalidUsername { problem: UsernameProblem },

    #[error("a password needs at least {min} characters")]
    PasswordTooShort { min: usize },

    #[error("a password may have at most {max} bytes")]
    PasswordTooLong { max: usize },

    #[error("a password must not be blank")]
    PasswordBlank,

    /// The operating system's random source failed; nothing secret was produced.
    #[error("the operating system's random number generator failed")]
    Entropy {
        #[source]
        source: rand::rngs::SysError,
    },

    /// argon2 refused its input (never expected with our parameters).
    #[error("could not hash the password")]
    Hash {
        #[source]
        source: argon2::password_hash::Error,
    },
}

// === roles ===

/// What a user may do; each role includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads everything.
    Viewer,
    /// Also annotates, synthesizes, simulates.
    Analyst,
    /// Also approves proposals and promotes workloads toward enforce.
    Approver,
    /// Also manages users and tokens.
    Admin,
}

impl Role {
    /// Every role, weakest first.
    pub const ALL: [Role; 4] = [Role::Viewer, Role::Analyst, Role::Approver, Role::Admin];

    /// The stored and displayed name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Analyst => "analyst",
            Role::Approver => "approver",
            Role::Admin => "admin",
        }
    }

    /// Whether this role may do what needs `required`.
    pub fn allows(self, required: Role) -> bool {
        self >= required
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = AuthError;
    fn from_str(s: &str) -> Result<Self, AuthError> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| AuthError::UnknownRole { given: s.chars().take(32).collect() })
    }
}

// === usernames ===

/// Why a username was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsernameProblem {
    Empty,
    TooLong,
    /// Leading or trailing whitespace, or whitespace other than a plain space.
    Whitespace,
    /// A control character (C0, DEL, C1).
    ControlCharacter,
    /// An invisible formatting character (bidi override, zero-width, soft hyphen…): it
    /// would let one name display as another in the UI and the audit log.
    InvisibleCharacter,
}

impl fmt::Display for UsernameProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            UsernameProblem::Empty => "it is empty",
            UsernameProblem::TooLong => "it is longer than 64 characters",
            UsernameProblem::Whitespace => "it has leading, trailing or non-space whitespace",
            UsernameProblem::ControlCharacter => "it contains a control character",
            UsernameProblem::InvisibleCharacter => "it contains an invisible formatting character",
        })
    }
}

/// A checked username: as entered (shown) and its case-folded key (unique, looked up).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Username {
    name: String,
    key: String,
}

impl Username {
    /// Checks `raw`: 1–[`MAX_USERNAME_CHARS`] characters, no control or invisible
    /// formatting characters, no whitespace at either end or other than a space. Any
    /// other text (quotes, SQL, non-Latin scripts, emoji) is a valid name, stored as data.
    pub fn parse(raw: &str) -> Result<Self, AuthError> {
        let bad = |problem| Err(AuthError::InvalidUsername { problem });
        if raw.is_empty() {
            return bad(UsernameProblem::Empty);
        }
        if raw.chars().count() > MAX_USERNAME_CHARS {
            return bad(UsernameProblem::TooLong);
        }
        if raw.chars().any(char::is_control) {
            return bad(UsernameProblem::ControlCharacter);
        }
        if raw.chars().any(is_invisible) {
            return bad(UsernameProblem::InvisibleCharacter);
        }
        if raw.trim() != raw || raw.chars().any(|c| c.is_whitespace() && c != ' ') {
            return bad(UsernameProblem::Whitespace);
        }
        Ok(Self { name: raw.to_owned(), key: username_key(raw) })
    }

    /// As entered.
    pub fn as_str(&self) -> &str {
        &self.name
    }

    /// The case-folded key: two names with the same key are the same user.
    pub fn key(&self) -> &str {
        &self.key
    }
}

impl fmt::Display for Username {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

/// The case-insensitive key of a name: upper- then lower-cased, which folds more than
/// lower-casing alone (`ß`/`SS`, final sigma). Computed here, not by the database:
/// SQLite's `lower()` only folds ASCII and PostgreSQL's depends on the collation.
pub fn username_key(name: &str) -> String {
    name.to_uppercase().to_lowercase()
}

/// Format characters (Unicode Cf) that render as nothing or reorder text.
fn is_invisible(c: char) -> bool {
    matches!(c,
        '\u{00AD}' | '\u{061C}' | '\u{180E}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}'
        | '\u{2060}'..='\u{2064}' | '\u{2066}'..='\u{206F}' | '\u{FEFF}' | '\u{FFF9}'..='\u{FFFB}'
        | '\u{E0000}'..='\u{E007F}')
}

// === passwords ===

/// Refuses passwords the policy does not allow: blank, shorter than
/// [`MIN_PASSWORD_CHARS`] characters, longer than [`MAX_PASSWORD_BYTES`] bytes.
pub fn check_password_policy(password: &str) -> Result<(), AuthError> {
    if password.trim().is_empty() {
        return Err(AuthError::PasswordBlank);
    }
    if password.len() > MAX_PASSWORD_BYTES {
        return Err(AuthError::PasswordTooLong { max: MAX_PASSWORD_BYTES });
    }
    if password.chars().count() < MIN_PASSWORD_CHARS {
        return Err(AuthError::PasswordTooShort { min: MIN_PASSWORD_CHARS });
    }
    Ok(())
}

/// An argon2id PHC string (`$argon2id$v=19$m=19456,t=2,p=1$salt$hash`): the only form a
/// password is stored in. Made only by [`hash_password`]; read back from the store with
/// [`PasswordHash::from_stored`].
#[derive(Clone, PartialEq, Eq)]
pub struct PasswordHash(String);

impl PasswordHash {
    /// The PHC string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A stored value; whether it verifies anything is [`verify_password`]'s question.
    pub fn from_stored(phc: String) -> Self {
        Self(phc)
    }
}

impl fmt::Debug for PasswordHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Not secret, but nobody needs it in a log line.
        f.write_str("PasswordHash(..)")
    }
}

fn argon2() -> Argon2<'static> {
    Argon2::new(Algorithm::Argon2id, Version::V0x13, ARGON2_PARAMS)
}

/// Hashes a password that passes [`check_password_policy`], with a fresh random salt.
/// Deliberately slow (tens of milliseconds optimised): call it off the async runtime
/// (`spawn_blocking`).
pub fn hash_password(password: &str) -> Result<PasswordHash, AuthError> {
    hash_password_with_salt(password, &random::<SALT_BYTES>()?)
}

/// [`hash_password`] with the salt given (tests; production salts are random).
pub fn hash_password_with_salt(password: &str, salt: &[u8; SALT_BYTES]) -> Result<PasswordHash, AuthError> {
    check_password_policy(password)?;
    let hash =
        argon2().hash_password_with_salt(password.as_bytes(), salt).map_err(|source| AuthError::Hash { source })?;
    Ok(PasswordHash(hash.to_string()))
}

/// Whether `password` matches `stored`. False — never a panic — for a wrong password,
/// an overlong one, and a stored value that is not an argon2id PHC string or asks for
/// more work than a login may cost.
pub fn verify_password(password: &str, stored: &PasswordHash) -> bool {
    if password.len() > MAX_PASSWORD_BYTES {
        return false;
    }
    let Ok(parsed) = argon2::PasswordHash::new(&stored.0) else { return false };
    if parsed.algorithm != Algorithm::Argon2id.ident() {
        return false;
    }
    let Ok(params) = Params::try_from(&parsed) else { return false };
    if params.m_cost() > MAX_VERIFY_M_COST_KIB
        || params.t_cost() > MAX_VERIFY_T_COST
        || params.p_cost() > MAX_VERIFY_P_COST
    {
        return false;
    }
    argon2().verify_password(password.as_bytes(), &parsed).is_ok()
}

/// Spends what a [`verify_password`] costs, for a login naming no user (or a disabled
/// one): the answer's timing then does not tell which names exist.
pub fn verify_dummy(password: &str) {
    static DUMMY: LazyLock<Option<PasswordHash>> =
        LazyLock::new(|| hash_password_with_salt("dummy password for unknown users", &[0x5a; SALT_BYTES]).ok());
    if let Some(dummy) = DUMMY.as_ref() {
        let _ = verify_password(password, dummy);
    }
}

/// Whether a stored hash uses other parameters than today's (re-hash it at the next
/// successful login).
pub fn needs_rehash(stored: &PasswordHash) -> bool {
    let Ok(parsed) = argon2::PasswordHash::new(&stored.0) else { return true };
    let Ok(params) = Params::try_from(&parsed) else { return true };
    parsed.salt.is_none()
        || parsed.hash.as_ref().map(|h| h.len()) != Some(Params::DEFAULT_OUTPUT_LEN)
        || parsed.algorithm != Algorithm::Argon2id.ident()
        || parsed.version != Some(Version::V0x13.into())
        || (params.m_cost(), params.t_cost(), params.p_cost())
            != (ARGON2_PARAMS.m_cost(), ARGON2_PARAMS.t_cost(), ARGON2_PARAMS.p_cost())
}

/// A fresh one-time password ([`ONE_TIME_PASSWORD_CHARS`] characters, ≈ 139 bits) for a
/// first admin or a reset. It passes the password policy.
pub fn one_time_password() -> Result<String, AuthError> {
    one_time_password_with(&mut SysRng).map_err(|source| AuthError::Entropy { source })
}

/// [`one_time_password`] drawing from `rng` (tests pass a seeded generator).
pub fn one_time_password_with<R: TryCryptoRng + ?Sized>(rng: &mut R) -> Result<String, R::Error> {
    // Rejection sampling: only bytes below the largest multiple of the alphabet's size,
    // so every symbol is equally likely.
    let n = OTP_ALPHABET.len();
    let limit = (256 / n * n) as u32;
    let mut out = String::with_capacity(ONE_TIME_PASSWORD_CHARS);
    let mut buf = [0u8; 32];
    while out.len() < ONE_TIME_PASSWORD_CHARS {
        rng.try_fill_bytes(&mut buf)?;
        for &b in &buf {
            if u32::from(b) < limit && out.len() < ONE_TIME_PASSWORD_CHARS {
                out.push(char::from(OTP_ALPHABET[usize::from(b) % n]));
            }
        }
    }
    Ok(out)
}

// === tokens ===

/// A session or API token in clear: shown once (cookie, CLI output), stored only as its
/// [`Token::digest`]. `Debug` does not print it.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    /// A fresh session token: [`TOKEN_BYTES`] random bytes, base64url (43 characters).
    pub fn session() -> Result<Self, AuthError> {
        Ok(Self::session_from(&random()?))
    }

    /// A fresh API token: [`API_TOKEN_PREFIX`] and [`TOKEN_BYTES`] random bytes, base64url.
    pub fn api() -> Result<Self, AuthError> {
        Ok(Self::api_from(&random()?))
    }

    /// The session token made of these bytes.
    pub fn session_from(bytes: &[u8; TOKEN_BYTES]) -> Self {
        Self(URL_SAFE_NO_PAD.encode(bytes))
    }

    /// The API token made of these bytes.
    pub fn api_from(bytes: &[u8; TOKEN_BYTES]) -> Self {
        Self(format!("{API_TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes)))
    }

    /// The token text, to hand to its owner once.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// What the store keeps.
    pub fn digest(&self) -> [u8; 32] {
        Sha256::digest(self.0.as_bytes()).into()
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(..)")
    }
}

/// The digest to look a submitted token up by; `None` for text that cannot be one of
/// ours (empty or longer than [`MAX_TOKEN_CHARS`]), which then matches nothing.
pub fn token_digest(submitted: &str) -> Option<[u8; 32]> {
    if submitted.is_empty() || submitted.len() > MAX_TOKEN_CHARS {
        return None;
    }
    Some(Sha256::digest(submitted.as_bytes()).into())
}

// === CSRF ===

/// A session's CSRF secret, stored with the session. Forms carry [`CsrfSecret::token`].
#[derive(Clone, PartialEq, Eq)]
pub struct CsrfSecret([u8; TOKEN_BYTES]);

impl CsrfSecret {
    /// A fresh random secret.
    pub fn generate() -> Result<Self, AuthError> {
        Ok(Self(random()?))
    }

    pub fn from_bytes(bytes: [u8; TOKEN_BYTES]) -> Self {
        Self(bytes)
    }

    /// A stored value; `None` unless exactly [`TOKEN_BYTES`] long.
    pub fn from_stored(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok().map(Self)
    }

    pub fn as_bytes(&self) -> &[u8; TOKEN_BYTES] {
        &self.0
    }

    /// A token for one form: base64url of a fresh random mask and the secret XOR the
    /// mask. Every page gets different bytes; all of them verify.
    pub fn token(&self) -> Result<String, AuthError> {
        Ok(self.token_with_mask(&random()?))
    }

    /// [`CsrfSecret::token`] with the mask given.
    pub fn token_with_mask(&self, mask: &[u8; TOKEN_BYTES]) -> String {
        let mut raw = [0u8; 2 * TOKEN_BYTES];
        for i in 0..TOKEN_BYTES {
            raw[i] = mask[i];
            raw[TOKEN_BYTES + i] = mask[i] ^ self.0[i];
        }
        URL_SAFE_NO_PAD.encode(raw)
    }

    /// Whether `submitted` is a token of this secret; the secret is compared in
    /// constant time. Anything malformed is simply false.
    pub fn verify(&self, submitted: &str) -> bool {
        if submitted.len() > MAX_TOKEN_CHARS {
            return false;
        }
        let Ok(raw) = URL_SAFE_NO_PAD.decode(submitted) else { return false };
        let Some((mask, masked)) = raw.split_at_checked(TOKEN_BYTES) else { return false };
        if masked.len() != TOKEN_BYTES {
            return false;
        }
        let mut unmasked = [0u8; TOKEN_BYTES];
        for i in 0..TOKEN_BYTES {
            unmasked[i] = mask[i] ^ masked[i];
        }
        unmasked.ct_eq(&self.0).into()
    }
}

impl fmt::Debug for CsrfSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CsrfSecret(..)")
    }
}

/// `N` bytes from the operating system.
fn random<const N: usize>() -> Result<[u8; N], AuthError> {
    let mut out = [0u8; N];
    SysRng.try_fill_bytes(&mut out).map_err(|source| AuthError::Entropy { source })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    /// One hash for the tests that need a valid one (argon2 is slow unoptimised).
    fn hashed() -> &'static PasswordHash {
        static H: LazyLock<PasswordHash> =
            LazyLock::new(|| hash_password_with_salt("correct horse battery", &[7; SALT_BYTES]).expect("hash"));
        &H
    }

    #[test]
    fn roles_are_ordered_and_round_trip() {
        assert!(Role::Viewer < Role::Analyst && Role::Analyst < Role::Approver && Role::Approver < Role::Admin);
        for (i, r) in Role::ALL.into_iter().enumerate() {
            assert_eq!(r.as_str().parse::<Role>().expect("parse"), r);
            assert_eq!(r.to_string(), r.as_str());
            assert_eq!(serde_json::to_string(&r).expect("json"), format!("\"{r}\""));
            for (j, q) in Role::ALL.into_iter().enumerate() {
                assert_eq!(r.allows(q), i >= j, "{r} allows {q}");
            }
        }
        assert!(Role::Approver.allows(Role::Approver) && !Role::Analyst.allows(Role::Approver));
        for bad in ["", "Admin", "root", " admin", "admin\0"] {
            assert!(matches!(bad.parse::<Role>(), Err(AuthError::UnknownRole { .. })), "{bad:?}");
        }
    }

    #[test]
    fn hash_verifies_its_password_only() {
        let h = hashed();
        assert!(h.as_str().starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{}", h.as_str());
        assert!(verify_password("correct horse battery", h));
        assert!(!verify_password("correct horse batterY", h));
        assert!(!verify_password("", h));
        assert!(!needs_rehash(h));
        assert!(!format!("{h:?}").contains("argon2"), "Debug hides the hash");
        // A fresh salt each time.
        let a = hash_password("another long password").expect("hash a");
        let b = hash_password("another long password").expect("hash b");
        assert_ne!(a, b);
        assert!(verify_password("another long password", &a) && verify_password("another long password", &b));
    }

    #[test]
    fn malformed_or_costly_stored_hashes_are_false_not_panics() {
        let good = hashed().as_str().to_owned();
        let mut cases: Vec<String> = vec![
            String::new(),
            "$".into(),
            "$argon2id$".into(),
            "$argon2id$v=19$m=19456,t=2,p=1$".into(),
            "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$".into(),
            "$argon2id$v=99$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaA".into(),
            "$argon2id$v=19$m=0,t=0,p=0$c2FsdHNhbHQ$aGFzaA".into(),
            // Parameters a tampered row might ask for: refused before any work.
            good.replace("m=19456", "m=4294967295"),
            good.replace("t=2", "t=4294967295"),
            good.replace("p=1", "p=255"),
            good.replace("$argon2id$", "$argon2i$"),
            good.replace("$argon2id$", "$argon2d$"),
            "$2b$12$abcdefghijklmnopqrstuuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZa".into(),
            "plaintext password".into(),
            "$argon2id$v=19$m=19456,t=2,p=1$\u{0}$\u{0}".into(),
            "ünïcödé 🚀 \u{202e}".into(),
        ];
        // Every truncation of a good hash.
        cases.extend((0..good.len()).filter(|&i| good.is_char_boundary(i)).map(|i| good[..i].to_owned()));
        for c in cases {
            let stored = PasswordHash::from_stored(c.clone());
            assert!(!verify_password("correct horse battery", &stored), "{c:?}");
            assert!(needs_rehash(&stored) || c == good, "{c:?}");
        }
        assert!(!verify_password(&"x".repeat(MAX_PASSWORD_BYTES + 1), hashed()));
        verify_dummy("whatever");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// Whatever a row holds, verifying is an answer, never a panic. Small costs only,
        /// so parameter sets that pass the bounds run quickly unoptimised.
        #[test]
        fn verify_never_panics(
            stored in "\\$argon2(id|i|d)?\\$(v=(16|19|99)\\$)?m=[0-9]{1,4},t=[0-9],p=[0-9]\\$[A-Za-z0-9+/.=$-]{0,30}\\$?[A-Za-z0-9+/=]{0,60}",
            any in ".{0,200}",
            password in ".{0,40}",
        ) {
            let _ = verify_password(&password, &PasswordHash::from_stored(stored.clone()));
            let _ = needs_rehash(&PasswordHash::from_stored(stored));
            let _ = verify_password(&password, &PasswordHash::from_stored(any));
        }
    }

    #[test]
    fn password_policy() {
        assert!(check_password_policy("twelve chars").is_ok());
        assert!(check_password_policy("ünïcödé-pässwörd").is_ok(), "counted in characters");
        assert!(check_password_policy(&"x".repeat(MAX_PASSWORD_BYTES)).is_ok());
        assert!(matches!(check_password_policy("eleven char"), Err(AuthError::PasswordTooShort { min: 12 })));
        assert!(matches!(check_password_policy(""), Err(AuthError::PasswordBlank)));
        assert!(matches!(check_password_policy(" \t\n            "), Err(AuthError::PasswordBlank)));
        assert!(matches!(
            check_password_policy(&"x".repeat(MAX_PASSWORD_BYTES + 1)),
            Err(AuthError::PasswordTooLong { max: MAX_PASSWORD_BYTES })
        ));
        // 4-byte characters: 300 of them are 1200 bytes.
        assert!(matches!(check_password_policy(&"🚀".repeat(300)), Err(AuthError::PasswordTooLong { .. })));
        assert!(matches!(hash_password("short"), Err(AuthError::PasswordTooShort { .. })), "hashing applies it");
    }

    #[test]
    fn one_time_passwords_are_long_random_and_pass_the_policy() {
        let a = one_time_password().expect("otp");
        let b = one_time_password().expect("otp");
        assert_ne!(a, b);
        for p in [&a, &b] {
            assert_eq!(p.chars().count(), ONE_TIME_PASSWORD_CHARS);
            assert!(p.bytes().all(|c| OTP_ALPHABET.contains(&c)), "{p}");
            check_password_policy(p).expect("policy");
        }
        // Deterministic with a seeded generator, and every symbol shows up.
        let mut rng = StdRng::seed_from_u64(1);
        let x = one_time_password_with(&mut rng).expect("seeded");
        assert_eq!(x, one_time_password_with(&mut StdRng::seed_from_u64(1)).expect("seeded"));
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..200 {
            seen.extend(one_time_password_with(&mut rng).expect("seeded").bytes());
        }
        assert_eq!(seen.len(), OTP_ALPHABET.len());
        for c in "0oO1lI".bytes() {
            assert!(!OTP_ALPHABET.contains(&c), "look-alike {}", char::from(c));
        }
    }

    #[test]
    fn tokens_are_random_base64url_and_hashed_for_storage() {
        let s = Token::session().expect("token");
        assert_eq!(s.expose().len(), 43);
        assert!(s.expose().bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        assert_ne!(s, Token::session().expect("token"));
        let a = Token::api().expect("token");
        assert!(a.expose().starts_with(API_TOKEN_PREFIX) && a.expose().len() == 47);
        assert_eq!(Token::session_from(&[0; 32]).expose(), "A".repeat(43));
        assert_eq!(s.digest(), token_digest(s.expose()).expect("digest"));
        assert_eq!(s.digest(), <[u8; 32]>::from(Sha256::digest(s.expose().as_bytes())));
        assert_eq!(format!("{s:?}"), "Token(..)");
        assert_eq!(token_digest(""), None);
        assert_eq!(token_digest(&"a".repeat(MAX_TOKEN_CHARS + 1)), None);
    }

    #[test]
    fn csrf_accepts_tokens_of_its_secret_only() {
        let secret = CsrfSecret::from_bytes([9; TOKEN_BYTES]);
        let other = CsrfSecret::generate().expect("secret");
        let t1 = secret.token().expect("token");
        let t2 = secret.token().expect("token");
        assert_ne!(t1, t2, "a fresh mask per token");
        assert!(secret.verify(&t1) && secret.verify(&t2));
        assert!(!other.verify(&t1));
        assert!(other.verify(&other.token().expect("token")));
        // The unmasked secret itself, flipped bits, truncations, junk: all refused.
        let plain = URL_SAFE_NO_PAD.encode(secret.as_bytes());
        let mut flipped = URL_SAFE_NO_PAD.decode(&t1).expect("b64");
        flipped[40] ^= 1;
        let flipped = URL_SAFE_NO_PAD.encode(flipped);
        for bad in [plain.as_str(), flipped.as_str(), &t1[..t1.len() - 1], &t1[..20], "", "!!!!", &"A".repeat(86)] {
            assert!(!secret.verify(bad), "{bad:?}");
        }
        assert!(!secret.verify(&format!("{t1}AAAA")));
        assert!(!secret.verify(&"A".repeat(10_000)));
        let zero_mask = secret.token_with_mask(&[0; TOKEN_BYTES]);
        assert!(secret.verify(&zero_mask));
        assert_eq!(CsrfSecret::from_stored(secret.as_bytes()), Some(secret.clone()));
        assert_eq!(CsrfSecret::from_stored(&[1; 31]), None);
        assert_eq!(format!("{secret:?}"), "CsrfSecret(..)");
    }

    #[test]
    fn usernames() {
        for ok in ["alice", "Alice Smith", "'); DROP TABLE users;--", "it's \"quoted\"", "ünïcödé 🚀", "ß", "用户"]
        {
            let u = Username::parse(ok).unwrap_or_else(|e| panic!("{ok:?}: {e}"));
            assert_eq!(u.as_str(), ok);
        }
        assert_eq!(Username::parse("ALICE").expect("u").key(), Username::parse("alice").expect("u").key());
        assert_eq!(username_key("STRASSE"), username_key("straße"));
        assert_eq!(username_key("ΣΊΣΥΦΟΣ"), username_key("σίσυφος"));
        let bad = |raw: &str, want: UsernameProblem| match Username::parse(raw) {
            Err(AuthError::InvalidUsername { problem }) => assert_eq!(problem, want, "{raw:?}"),
            other => panic!("{raw:?}: {other:?}"),
        };
        bad("", UsernameProblem::Empty);
        bad(&"a".repeat(MAX_USERNAME_CHARS + 1), UsernameProblem::TooLong);
        assert!(Username::parse(&"ü".repeat(MAX_USERNAME_CHARS)).is_ok(), "counted in characters");
        bad("a\0b", UsernameProblem::ControlCharacter);
        bad("a\nb", UsernameProblem::ControlCharacter);
        bad("a\u{7f}", UsernameProblem::ControlCharacter);
        bad("a\u{85}", UsernameProblem::ControlCharacter);
        bad("adm\u{202e}nimda", UsernameProblem::InvisibleCharacter);
        bad("ad\u{200b}min", UsernameProblem::InvisibleCharacter);
        bad(" alice", UsernameProblem::Whitespace);
        bad("alice ", UsernameProblem::Whitespace);
        bad("al\u{2003}ice", UsernameProblem::Whitespace);
    }
}
