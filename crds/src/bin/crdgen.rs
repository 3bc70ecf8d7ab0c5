//! Writes the CRD YAML of every meshauth resource into `config/crds/` and the Helm chart's
//! `crds/` (or only into the directory given as the only argument). CI fails when the committed
//! files differ from what this writes.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let dirs = match std::env::args_os().nth(1) {
        Some(dir) => vec![PathBuf::from(dir)],
        None => meshauth_crds::CRD_DIRS.iter().map(|d| root.join(d)).collect(),
    };
    for dir in dirs {
        std::fs::create_dir_all(&dir)?;
        for (file, crd) in meshauth_crds::all_crds() {
            let path = dir.join(file);
            std::fs::write(&path, meshauth_crds::crd_yaml(&crd)?)?;
            println!("wrote {}", path.display());
        }
    }
    Ok(())
}
