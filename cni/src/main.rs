//! `meshauth-cni`: the process edge of the plugin (environment and stdin in, stdout and exit
//! status out, as the CNI spec says).

use std::io::Read;

fn main() {
    let mut stdin = String::new();
    // A runtime that sends nothing (VERSION) closes stdin; a read error is the same as empty.
    let _ = std::io::stdin().take(1 << 20).read_to_string(&mut stdin);
    let invocation = meshauth_cni::plugin::Invocation::from_env(|k| std::env::var(k).ok(), &stdin);
    let outcome = invocation.as_ref().map_err(Clone::clone).and_then(meshauth_cni::plugin::run);
    match outcome {
        Ok(out) => {
            if !out.is_empty() {
                println!("{out}");
            }
        }
        Err(error) => {
            let version = invocation.as_ref().map_or_else(|_| "1.0.0".to_owned(), |i| i.cni_version());
            println!("{}", error.to_json(&version));
            eprintln!("meshauth-cni: {}: {}", error.msg, error.details);
            std::process::exit(1);
        }
    }
}
