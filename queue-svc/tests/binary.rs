//! The queue-svc binary as an operator runs it.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_explains_options_serves_health_and_reflection_and_stops_on_sigterm()
-> anyhow::Result<()> {
    sluice_testkit::binary::check_service_binary(
        env!("CARGO_BIN_EXE_queue-svc"),
        &["sluice.queue.v1.Queue"],
    )
    .await
}
