//! `sqlx::migrate!` embeds `migrations/` at compile time; tell cargo to rebuild the
//! learner when a migration changes (it does not notice on its own).

fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
