//! A generator following a trainer that goes away and comes back: it keeps serving the live
//! checkpoint, reconnects, and picks up the checkpoints written while it was cut off.

mod e2e;

use std::time::Duration;

use e2e::{eventually, generate, generate_request, tiny_request, train, Generator, Trainer};
use e2e::{CORPUS, LONG};
use synopsis_proto::v1 as pb;
use synopsis_tests::{free_port, health_status};
use tonic::transport::Endpoint;
use tonic_health::pb::health_check_response::ServingStatus;

async fn live_checkpoint(generator: &Generator) -> String {
    let mut client = generator.client().await;
    client
        .model_info(pb::ModelInfoRequest {})
        .await
        .map(|r| r.into_inner().live_checkpoint_id)
        .unwrap_or_default()
}

async fn newest_checkpoint(trainer: &Trainer) -> String {
    let mut client = trainer.client().await;
    let (_, events) = train(&mut client, tiny_request(CORPUS)).await;
    let done = e2e::finished(&events).expect("finished");
    assert_eq!(done.state, pb::RunState::Completed as i32, "{done:?}");
    e2e::checkpoints(&events)
        .pop()
        .expect("a checkpoint")
        .checkpoint_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generator_survives_its_trainer_going_away_and_catches_up() {
    let dir = tempfile::tempdir().unwrap();
    let (root, data) = (dir.path().join("root"), dir.path().join("data"));
    std::fs::create_dir_all(&data).unwrap();
    e2e::write_corpus(&data);
    let port = free_port();
    let trainer = Trainer::start_on(&root, &data, port, &[]).await;
    let first = newest_checkpoint(&trainer).await;

    let generator = Generator::start(&["--trainer".into(), trainer.url()]).await;
    eventually(LONG, "the first checkpoint live", || async {
        (live_checkpoint(&generator).await == first).then_some(())
    })
    .await;

    // The trainer dies without a goodbye.
    trainer.process.sigkill();
    trainer.process.wait_exit(LONG).expect("killed");
    drop(trainer);
    let mut client = generator.client().await;
    for _ in 0..3 {
        let (served_by, done) = generate(&mut client, generate_request(8)).await.unwrap();
        assert_eq!(served_by, first);
        assert_eq!(done.len(), 1);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let endpoint = Endpoint::from_shared(generator.url()).unwrap();
    assert_eq!(
        health_status(endpoint).await.unwrap(),
        ServingStatus::Serving
    );

    // While the generator is cut off, another trainer process on the same root trains.
    let meanwhile = {
        let other = Trainer::start(&root, &data, &[]).await;
        let id = newest_checkpoint(&other).await;
        other.process.sigterm();
        other.process.wait_exit(LONG).expect("stops");
        id
    };
    assert_ne!(meanwhile, first);
    assert_eq!(live_checkpoint(&generator).await, first);

    // The trainer comes back where the generator expects it: the newest checkpoint goes live.
    let trainer = Trainer::start_on(&root, &data, port, &[]).await;
    eventually(LONG, "the checkpoint made meanwhile live", || async {
        (live_checkpoint(&generator).await == meanwhile).then_some(())
    })
    .await;
    // And it follows new ones again.
    let next = newest_checkpoint(&trainer).await;
    eventually(LONG, "a new checkpoint live", || async {
        (live_checkpoint(&generator).await == next).then_some(())
    })
    .await;
    let (served_by, _) = generate(&mut client, generate_request(8)).await.unwrap();
    assert_eq!(served_by, next);
}
