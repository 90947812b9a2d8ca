"""OGBench's oracle goal representation ("-oraclerep") computed from stored states.

The manipulation envs define `compute_oracle_observation()` on their live simulator state; this module
computes the same vectors from a dataset's `qpos` (and `button_states`) rows, so `-oraclerep` training
needs no simulator. The qpos layout is fixed by the MJCF models: 6 UR5e arm joints and 8 Robotiq
gripper joints come first (14 entries), then the objects in the order the envs add them.
"""

import re

import numpy as np

ARM_AND_GRIPPER_NQ = 14
XYZ_CENTER = np.array([0.425, 0.0, 0.0])
XYZ_SCALER = 10.0
# Scene: joints after the cube's free joint are buttonbox_joint_0/1, drawer_slide, window_slide.
SCENE_NQ = ARM_AND_GRIPPER_NQ + 7 + 4
SCENE_DRAWER_QPOS, SCENE_WINDOW_QPOS = 23, 24
SCENE_DRAWER_SCALER, SCENE_WINDOW_SCALER = 18.0, 15.0
SCENE_NUM_BUTTONS = 2

NUM_CUBES = {'single': 1, 'double': 2, 'triple': 3, 'quadruple': 4}
PUZZLE_SIZES = {'3x3': (3, 3), '4x4': (4, 4), '4x5': (4, 5), '4x6': (4, 6)}


class OracleGoalError(ValueError):
    """The environment is not a manipulation env, or the states do not fit its layout."""


def env_family(env_name: str) -> str:
    """Reduce any OGBench manipulation name to its env family, e.g. 'visual-cube-single-play-v0' -> 'cube-single'."""
    name = re.sub(r'^visual-', '', env_name)
    name = re.sub(r'-v\d+$', '', name)
    name = re.sub(r'-(play|noisy|oraclerep)', '', name)
    cube = re.fullmatch(r'cube-(single|double|triple|quadruple)', name)
    puzzle = re.fullmatch(r'puzzle-(3x3|4x4|4x5|4x6)', name)
    if cube or puzzle or name == 'scene':
        return name
    raise OracleGoalError(
        f'{env_name!r} is not an OGBench manipulation env (cube-single/double/triple/quadruple, scene, '
        f'puzzle-3x3/4x4/4x5/4x6); oracle goals exist only for these'
    )


def oracle_goal_dim(env_name: str) -> int:
    """Length of the oracle goal vector: 3 per cube, 7 for scene, one per button for puzzle."""
    family = env_family(env_name)
    if family.startswith('cube-'):
        return 3 * NUM_CUBES[family.split('-')[1]]
    if family == 'scene':
        return 3 + SCENE_NUM_BUTTONS + 2
    rows, cols = PUZZLE_SIZES[family.split('-')[1]]
    return rows * cols


def oracle_goals(env_name: str, qpos: np.ndarray, button_states: np.ndarray | None = None) -> np.ndarray:
    """Oracle goal vectors, float32 (N, G), for qpos rows (N, nq) and button_states rows (N, B).

    Matches the envs' compute_oracle_observation(): cube-*: (cube_xyz - [0.425, 0, 0]) * 10 per cube;
    scene: cube term, the 2 button states, drawer qpos * 18, window qpos * 15; puzzle: the button states.
    """
    family = env_family(env_name)
    qpos = np.asarray(qpos, dtype=np.float64)
    if qpos.ndim != 2:
        raise OracleGoalError(f'qpos must be 2-D (N, nq), got shape {qpos.shape}')

    if family.startswith('cube-'):
        num_cubes = NUM_CUBES[family.split('-')[1]]
        _check_width('qpos', qpos, ARM_AND_GRIPPER_NQ + 7 * num_cubes, family)
        xyzs = [_cube_xyz(qpos, i) for i in range(num_cubes)]
        goals = np.concatenate([(xyz - XYZ_CENTER) * XYZ_SCALER for xyz in xyzs], axis=1)
    elif family == 'scene':
        _check_width('qpos', qpos, SCENE_NQ, family)
        buttons = _buttons(button_states, len(qpos), SCENE_NUM_BUTTONS, family)
        goals = np.concatenate(
            [
                (_cube_xyz(qpos, 0) - XYZ_CENTER) * XYZ_SCALER,
                buttons,
                qpos[:, [SCENE_DRAWER_QPOS]] * SCENE_DRAWER_SCALER,
                qpos[:, [SCENE_WINDOW_QPOS]] * SCENE_WINDOW_SCALER,
            ],
            axis=1,
        )
    else:
        rows, cols = PUZZLE_SIZES[family.split('-')[1]]
        _check_width('qpos', qpos, ARM_AND_GRIPPER_NQ + rows * cols, family)
        goals = _buttons(button_states, len(qpos), rows * cols, family)
    return goals.astype(np.float32)


def _cube_xyz(qpos: np.ndarray, cube_index: int) -> np.ndarray:
    start = ARM_AND_GRIPPER_NQ + 7 * cube_index  # free joint: xyz then quaternion
    return qpos[:, start : start + 3]


def _check_width(what: str, array: np.ndarray, expected: int, family: str) -> None:
    if array.shape[1] != expected:
        raise OracleGoalError(f'{family}: {what} rows must have {expected} entries, got shape {array.shape}')


def _buttons(button_states: np.ndarray | None, num_rows: int, num_buttons: int, family: str) -> np.ndarray:
    if button_states is None:
        raise OracleGoalError(f'{family}: oracle goals include the button states; pass button_states')
    buttons = np.asarray(button_states)
    if buttons.ndim != 2 or buttons.shape != (num_rows, num_buttons):
        raise OracleGoalError(
            f'{family}: button_states must have shape ({num_rows}, {num_buttons}), got {buttons.shape}'
        )
    return buttons.astype(np.float64)
