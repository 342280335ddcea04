pub fn run(_ws: &std::path::Path, _part: Option<&str>) -> anyhow::Result<()> {
    anyhow::bail!("bench: not yet")
}
