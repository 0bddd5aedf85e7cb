//! Rebuilds vault-core when a migration is added or changed: `sqlx::migrate!` embeds the files
//! at compile time, and cargo does not otherwise watch a directory outside the crate.
fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
