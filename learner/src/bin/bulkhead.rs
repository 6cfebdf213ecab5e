fn main() -> anyhow::Result<()> {
    anyhow::bail!("not wired yet")
}
