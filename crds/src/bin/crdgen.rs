//! Writes the CRD YAML of every meshauth resource into `config/crds/` (or the directory given
//! as the only argument). CI fails when the committed files differ from what this writes.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../config/crds"));
    std::fs::create_dir_all(&dir)?;
    for (file, crd) in meshauth_crds::all_crds() {
        let path = dir.join(file);
        std::fs::write(&path, meshauth_crds::crd_yaml(&crd)?)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
