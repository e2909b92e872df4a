"""What the UI review counts as a grid in view and a page still loading, and what a run logs as params (the image
card prints them all above the grid)."""

from pathlib import Path

import yaml

from sd3ray.tracking.ui_review import MIN_GRID_PX, MIN_SHOWN, GridView, UiReview


def test_a_grid_is_in_view_only_when_most_of_its_loaded_picture_shows_uncovered_and_large() -> None:
    assert GridView("image", shown=1.0, width=249, height=249).visible
    assert GridView("image", shown=MIN_SHOWN, width=249, height=249).visible
    assert GridView("image", shown=0.25, width=249, height=249).why_not() == (
        "25% of its picture is in view (the rest is outside the card's scroll area or the window)")
    assert "drawn over" in GridView("image", shown=1.0, width=249, height=249, covered=True).why_not()
    small = MIN_GRID_PX - 1
    assert GridView("image", shown=1.0, width=small, height=small).why_not() == (
        f"its picture is drawn {small}×{small} px")
    assert "No image logged" in GridView("empty").why_not() and "never loaded" in GridView("loading").why_not()
    assert not GridView().visible  # no card at all


def test_the_review_names_a_page_still_loading_and_a_grid_out_of_view() -> None:
    seen, cut = GridView("image", shown=0.8, width=249, height=249), GridView("image", shown=0.1, width=249, height=249)
    opened = {"experiment_view": "training", "sections": ["loss", "samples"], "first_chart": "loss/train"}
    assert UiReview(**opened, grid_at_open=seen, latest_grid_step=6, latest_grid=seen).problems(latest_step=6) == []
    loading = UiReview(**opened, grid_at_open=seen, latest_grid_step=6, latest_grid=cut,
                       still_loading={"experiment.png": "4 skeletons in view"})
    assert loading.problems(latest_step=6) == [
        "the page of experiment.png had not finished loading (4 skeletons in view)",
        "after one click on the grid's slider the card shows no picture: 10% of its picture is in view (the rest is "
        "outside the card's scroll area or the window)"]
    hidden = UiReview(**opened, grid_at_open=GridView("image", shown=0.0, width=249, height=249))
    assert hidden.problems() == ["the sample grid's card shows no picture when the page opens: 0% of its picture "
                                 "is in view (the rest is outside the card's scroll area or the window)"]


def test_a_run_logs_the_compared_config_keys_as_params_and_the_whole_config_as_config_yaml(
        tmp_path: Path, micro_config) -> None:
    from mlflow.tracking import MlflowClient

    from sd3ray.config import flatten
    from sd3ray.tracking.mlflow_tracker import COMPARED_PARAMS, MlflowTracker

    cfg = micro_config("tracking.run_name=params")
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MlflowTracker(store, "params")
    run_id = tracker.start(cfg)
    tracker.log_params({"global_batch": 16, "val/cfid_floor": 298.05016313203873})
    tracker.finish()
    client = MlflowClient(store)
    params = client.get_run(run_id).data.params
    assert params == {**{key: str(flatten(cfg)[key]) for key in COMPARED_PARAMS}, "global_batch": "16",
                      "val/cfid_floor": "298.05"}
    assert len(flatten(cfg)) > 3 * len(params)  # the rest of the config is not a param...
    logged = yaml.safe_load(Path(client.download_artifacts(run_id, "config.yaml", str(tmp_path))).read_text())
    assert logged["train"]["batch_size"] == cfg.train.batch_size  # ...but in config.yaml
    assert logged["model"]["num_heads"] == cfg.model.num_heads
