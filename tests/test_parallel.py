import pytest

from prorl_megatron.config import PrecisionConfig
from prorl_megatron.parallel import ParallelError, check_layout, read_launch_env


def test_torchrun_environment():
    env = read_launch_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "1234"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port, env.launcher) == \
        (3, 4, 1, "n1", 1234, "torchrun")


def test_slurm_environment():
    env = read_launch_env({"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "MASTER_ADDR": "gpu-001"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port, env.launcher) == \
        (9, 16, 1, "gpu-001", 29500, "slurm")


def test_single_process_environment_gets_a_free_port():
    env = read_launch_env({})
    assert (env.rank, env.world_size, env.launcher) == (0, 1, "single") and env.master_port > 0


def test_bad_environments():
    with pytest.raises(ParallelError, match="MASTER_ADDR is not set"):
        read_launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"})
    with pytest.raises(ParallelError, match="rank 4 is outside a world of size 4"):
        read_launch_env({"RANK": "4", "WORLD_SIZE": "4", "MASTER_ADDR": "x"})
    with pytest.raises(ParallelError, match="SLURM_NTASKS='two' is not an integer"):
        read_launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "two"})


def test_layout_must_factor():
    assert check_layout(32, 2, 2) == 8
    with pytest.raises(ParallelError, match=r"world size 6 is not divisible by parallel.tensor x parallel.pipeline "
                                            r"= 2 x 2 = 4; launch a multiple of 4 processes"):
        check_layout(6, 2, 2)


def test_fp8_without_transformer_engine_is_an_error():
    from prorl_megatron.models.architectures import model_dims
    from prorl_megatron.models.gpt import PrecisionError, transformer_config
    from tests.megatron.test_mapping import config

    with pytest.raises(PrecisionError, match="precision.fp8=e4m3 needs Transformer Engine"):
        transformer_config(model_dims(config()), PrecisionConfig(fp8="e4m3"), use_te=False)
    tc = transformer_config(model_dims(config()), PrecisionConfig(params_dtype="bfloat16"), tensor=2, use_te=False)
    assert tc.bf16 and tc.num_query_groups == 2 and tc.add_qkv_bias and not tc.gradient_accumulation_fusion
