//! `schema/gen-N.json` snapshots: the current one matches the code, and every
//! older one is still exactly its generation's surface and a subset of today's.
//!
//! When a change to the surface is intended, rewrite the current snapshot with
//! `AGENTWIRE_BLESS_SCHEMA=1 cargo test --test schema` (missing older snapshots
//! are created too; existing older ones are never rewritten).

use std::collections::BTreeSet;
use std::path::PathBuf;

use agentwire::PROTOCOL_VERSION;
use agentwire::version::{OLDEST_TESTED_GENERATION, surface_json};
use serde_json::Value;

fn path(generation: u8) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("schema/gen-{generation}.json"))
}

fn bless() -> bool {
    std::env::var_os("AGENTWIRE_BLESS_SCHEMA").is_some_and(|v| v == "1")
}

/// Rewrites the current snapshot and creates missing older ones, once per run
/// (tests run in parallel and must not see a half-written file).
fn bless_once() {
    static BLESSED: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    BLESSED.get_or_init(|| {
        if !bless() {
            return;
        }
        for generation in OLDEST_TESTED_GENERATION..=PROTOCOL_VERSION {
            let p = path(generation);
            if generation == PROTOCOL_VERSION || !p.exists() {
                std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                std::fs::write(&p, surface_json(generation)).unwrap();
            }
        }
    });
}

fn read(generation: u8) -> String {
    bless_once();
    let p = path(generation);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e} (AGENTWIRE_BLESS_SCHEMA=1 writes it)", p.display()))
}

fn types(surface: &Value) -> BTreeSet<(String, u64, u64)> {
    surface["types"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["name"].as_str().unwrap().to_string(), t["gen"].as_u64().unwrap(), t["flags"].as_u64().unwrap()))
        .collect()
}

#[test]
fn current_snapshot_matches_the_table() {
    assert_eq!(read(PROTOCOL_VERSION), surface_json(PROTOCOL_VERSION), "schema/gen-{PROTOCOL_VERSION}.json is stale");
    let current: Value = serde_json::from_str(&read(PROTOCOL_VERSION)).unwrap();
    assert_eq!(types(&current).len(), 46);
}

#[test]
fn every_older_snapshot_is_a_subset_of_the_current_surface() {
    let current: Value = serde_json::from_str(&read(PROTOCOL_VERSION)).unwrap();
    let current_types = types(&current);
    for generation in OLDEST_TESTED_GENERATION..PROTOCOL_VERSION {
        let text = read(generation);
        let old: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(old["generation"], generation, "gen-{generation}.json");
        assert_eq!(old["frame"], current["frame"], "gen-{generation}.json: frame constants changed");
        for (name, bit) in old["flags"].as_object().unwrap() {
            assert_eq!(&current["flags"][name], bit, "gen-{generation}.json: flag {name} changed");
        }
        if let Some(bulk) = old.get("bulk") {
            assert_eq!(bulk, &current["bulk"], "gen-{generation}.json: bulk constants changed");
        }
        let missing: Vec<_> = types(&old).difference(&current_types).cloned().collect();
        assert!(missing.is_empty(), "gen-{generation}.json: removed, renamed or moved: {missing:?}");
        // Append-only: no type may be added to a generation that has shipped.
        assert_eq!(
            text,
            surface_json(generation),
            "gen-{generation}.json: the table now gives generation {generation} another surface"
        );
    }
}

#[test]
fn generation_3_has_the_nineteen_types_of_its_time() {
    let gen3: Value = serde_json::from_str(&read(3)).unwrap();
    let names: BTreeSet<String> = types(&gen3).into_iter().map(|t| t.0).collect();
    assert_eq!(names.len(), 19);
    assert!(names.iter().all(|n| n.starts_with("core.exec.") || n.starts_with("core.fs.") || !n.contains("tcp")));
    assert!(!names.contains("core.error") && !names.contains("core.ping") && !names.contains("core.bootstrap"));
}
