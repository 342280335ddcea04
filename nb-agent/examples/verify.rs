fn main() {
    env_logger::init();
    let dir = std::path::Path::new("/sys/fs/bpf/nbverify");
    let _ = std::fs::remove_dir_all(dir);
    match nb_agent::dataplane::Dataplane::load(dir, 4096) {
        Ok(_) => println!("LOADED OK"),
        Err(e) => {
            println!("ERR {e}");
            let mut s: &dyn std::error::Error = &e;
            while let Some(x) = s.source() {
                println!("  caused by: {x}");
                s = x;
            }
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}
