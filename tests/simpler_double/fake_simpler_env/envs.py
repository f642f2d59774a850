"""Fake ManiSkill2_real2sim envs (see package docstring). Importing registers the gym ids."""
from __future__ import annotations

import gymnasium as gym
import numpy as np

from . import ASSET_DIR, GYM_NAMESPACE

GOOGLE_CONTROL = ("arm_pd_ee_delta_pose_align_interpolate_by_planner_"
                  "gripper_pd_joint_target_delta_pos_interpolate_by_planner")
WIDOWX_CONTROL = "arm_pd_ee_target_delta_pose_align2_gripper_pd_joint_pos"
# Constructor keyword arguments, as the real classes' __init__ chains accept them (ManiSkill2_real2sim
# ef7a4d4; tests/test_simpler_real.py compares these sets with the real ones). Anything else raises.
BASE_KWARGS = {
    "asset_root", "bg_name", "camera_cfgs", "control_freq", "control_mode", "disable_bad_material", "enable_shadow",
    "model_db_override", "model_ids", "model_json", "obs_mode", "prepackaged_config", "render_camera_cfgs",
    "render_config", "render_mode", "renderer", "renderer_kwargs", "reward_mode", "rgb_always_overlay_objects",
    "rgb_overlay_cameras", "rgb_overlay_mode", "rgb_overlay_path", "robot", "scene_name", "scene_offset",
    "scene_pose", "scene_root", "scene_table_height", "shader_dir", "sim_freq", "urdf_version"}
_GRASP = {"darker_lighting", "distractor_model_ids", "laid_vertically", "lr_switch", "require_lifting_obj_for_success",
          "slightly_brighter_lighting", "slightly_darker_lighting", "success_from_episode_stats", "upright"}
_MOVE_NEAR = {"ambient_only_lighting", "no_distractor", "original_lighting", "slightly_brighter_lighting",
              "slightly_darker_lighting"}
_DRAWER = {"cabinet_joint_friction", "camera_mode", "light_mode", "station_name"}
KIND_KWARGS = {
    "grasp": _GRASP,
    "grasp_distractor": _GRASP | {"distractor_config"},
    "move_near": _MOVE_NEAR,
    "move_near_v1": _MOVE_NEAR | {"light_mode"},
    "drawer": _DRAWER,
    "apple": _DRAWER | {"force_advance_subtask_time_steps"},
    "bridge": {"ambient_only_lighting", "original_lighting", "quat_configs", "slightly_brighter_lighting",
               "slightly_darker_lighting", "source_obj_name", "target_obj_name", "xy_configs"},
}
CAMERA = {"google": ("overhead_camera", 512, 640), "widowx": ("3rd_view_camera", 480, 640)}


def _quat_rotate(q, v):
    w, x, y, z = q
    r = np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
                  [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
                  [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]])
    return r @ np.asarray(v, dtype=np.float64)


def _space_of(obs):
    if isinstance(obs, dict):
        return gym.spaces.Dict({k: _space_of(v) for k, v in obs.items()})
    if np.issubdtype(obs.dtype, np.unsignedinteger):
        return gym.spaces.Box(0, np.iinfo(obs.dtype).max, obs.shape, obs.dtype)
    return gym.spaces.Box(-np.inf, np.inf, obs.shape, obs.dtype)


class Pose:
    def __init__(self, p, q):
        self.p, self.q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)


class _Link:
    def __init__(self):
        self.pose = Pose([0, 0, 0], [1, 0, 0, 0])


class _Robot:
    def __init__(self, n_joints):
        self.pose = Pose([0, 0, 0], [1, 0, 0, 0])
        self.qpos = np.zeros(n_joints)

    def get_qpos(self):
        return self.qpos.copy()


class _GoogleAgent:
    """Relative gripper: the action in [-1, 1] is scaled to +-1.31 rad and added to the target.
    The fingers are qpos[-4:-2]; the last two joints are the camera's pan and tilt."""
    FINGER_HIGH = 1.3

    def __init__(self):
        self.robot, self.target = _Robot(11), 0.0
        self.robot.qpos[-2:] = [-0.00286, 0.785]  # head pan / tilt, as the real robot's reset leaves them

    def set_gripper(self, a):
        if abs(a) >= 1e-3:  # small_action_repeat_last_target
            self.target = float(np.clip(self.target + 1.31 * a, 0.0, self.FINGER_HIGH))
        self.robot.qpos[-4:-2] = self.target

    def get_gripper_closedness(self):
        return float(max(np.mean(self.robot.qpos[-4:-2] / self.FINGER_HIGH), 0.0))


class _WidowXAgent:
    """Absolute gripper: [-1, 1] maps onto finger positions [0.015, 0.037] m; -1 closed."""
    LOW, HIGH = 0.015, 0.037

    def __init__(self):
        self.robot = _Robot(8)
        self.robot.qpos[-2:] = self.HIGH

    def set_gripper(self, a):
        self.robot.qpos[-2:] = self.LOW + (float(a) + 1.0) / 2.0 * (self.HIGH - self.LOW)

    def get_gripper_closedness(self):
        return float(max(np.mean((self.HIGH - self.robot.qpos[-2:]) / (self.HIGH - self.LOW)), 0.0))


class FakeSceneEnv(gym.Env):
    KIND = "grasp"
    ROBOT = "google"
    INSTRUCTIONS = ("pick coke can",)

    def __init__(self, obs_mode=None, robot=None, control_mode=None, control_freq=None, sim_freq=None,
                 prepackaged_config=False, renderer_kwargs=None, rgb_overlay_path=None, rgb_overlay_cameras=(),
                 urdf_version=None, **kwargs):
        unknown = set(kwargs) - BASE_KWARGS - KIND_KWARGS[self.KIND]
        if unknown:
            raise TypeError(f"{type(self).__name__}.__init__() got unexpected keyword arguments {sorted(unknown)}")
        if prepackaged_config:  # the env fills in its own visual-matching config
            robot = "google_robot_static" if self.ROBOT == "google" else "widowx"
            control_mode = GOOGLE_CONTROL if self.ROBOT == "google" else WIDOWX_CONTROL
            rgb_overlay_path = str(ASSET_DIR / "real_inpainting" / "prepackaged.png")
            rgb_overlay_cameras = [CAMERA[self.ROBOT][0]]
        expected = GOOGLE_CONTROL if self.ROBOT == "google" else WIDOWX_CONTROL
        if control_mode != expected:
            raise ValueError(f"control mode {control_mode!r} is not the evaluation controller {expected!r}")
        if rgb_overlay_path is not None and not str(rgb_overlay_path).startswith(str(ASSET_DIR)):
            raise FileNotFoundError(f"rgb_overlay_path {rgb_overlay_path} is not found")
        self.make_kwargs = dict(obs_mode=obs_mode, robot=robot, control_mode=control_mode, control_freq=control_freq,
                                sim_freq=sim_freq, prepackaged_config=prepackaged_config,
                                renderer_kwargs=renderer_kwargs, rgb_overlay_path=rgb_overlay_path,
                                rgb_overlay_cameras=rgb_overlay_cameras, urdf_version=urdf_version, **kwargs)
        self.obs_mode, self.robot_uid, self.prepackaged_config = obs_mode, robot, prepackaged_config
        self.urdf_version = urdf_version or ""
        self.force_advance = int(kwargs.get("force_advance_subtask_time_steps", 100))
        self.agent = _GoogleAgent() if self.ROBOT == "google" else _WidowXAgent()
        self.tcp = _Link()  # a sapien.Link in the real env: the TCP pose is tcp.pose
        self.action_space = gym.spaces.Box(np.array([-1, -1, -1, -np.pi / 2, -np.pi / 2, -np.pi / 2, -1.0]),
                                           np.array([1, 1, 1, np.pi / 2, np.pi / 2, np.pi / 2, 1.0]), dtype=np.float64)
        self.z0, self.cur_subtask_id = 0.0, 0
        self.observation_space = _space_of(self._obs())  # real envs also derive it from an observation
        self._main_rng = np.random.RandomState(2022)  # as the real constructor's reset(seed=2022) leaves it
        self.actions: list[np.ndarray] = []
        self.cur_subtask_id = 0
        self.elapsed_steps = 0

    # -- documented API ----------------------------------------------------------------
    def get_language_instruction(self):
        return self.INSTRUCTIONS[min(self.cur_subtask_id, len(self.INSTRUCTIONS) - 1)]

    def is_final_subtask(self):
        return True

    def advance_to_next_subtask(self):
        raise NotImplementedError

    def reset(self, seed=None, options=None):
        options = dict(options or {})
        if seed is None:  # the episode seed is the main RNG's next draw; then the main RNG is reseeded
            seed = int(self._main_rng.randint(2 ** 32))
        self._main_rng = np.random.RandomState(seed)
        self.episode_seed = seed
        rng = np.random.RandomState(seed)
        self.reset_options = options
        robot_opts = options.get("robot_init_options", {})
        xy = robot_opts.get("init_xy")
        if xy is None:  # prepackaged / default: random robot placement from the episode rng
            xy = rng.uniform([0.30, 0.0], [0.40, 0.2])
        q = robot_opts.get("init_rot_quat", [0, 0, 0, 1])
        self.agent.robot.pose = Pose([xy[0], xy[1], 0.079], q)
        self.tcp.pose = Pose(self.agent.robot.pose.p + _quat_rotate(q, [0.4, 0.0, 0.8]), [1, 0, 0, 0])
        self.z0 = float(self.tcp.pose.p[2])
        self.cur_subtask_id, self.elapsed_steps, self.actions = 0, 0, []
        # toy distractors: an offset around the object from the episode RNG (the real rule's shape)
        obj_xy = np.asarray(options.get("obj_init_options", {}).get("init_xy", [-0.2, 0.2]), dtype=np.float64)
        self.distractor_xy = ([(obj_xy + rng.uniform(-0.2, 0.2, 2)).tolist() for _ in range(4)]
                              if self.KIND == "grasp_distractor" else [])
        self.episode_stats = {"moved_up": False}
        return self._obs(), {"scene_name": self.make_kwargs.get("scene_name"), "urdf_version": self.urdf_version}

    def step(self, action):
        action = np.asarray(action, dtype=np.float64)
        assert action.shape == (7,), action.shape
        self.actions.append(action.copy())
        if self.KIND == "apple" and self.elapsed_steps >= self.force_advance:
            self.advance_to_next_subtask()  # the real env checks the elapsed steps before stepping
        self.tcp.pose.p = self.tcp.pose.p + _quat_rotate(self.agent.robot.pose.q, action[:3])  # base-frame delta
        self.agent.set_gripper(action[6])
        self.elapsed_steps += 1
        info = self.evaluate()
        info["elapsed_steps"] = self.elapsed_steps
        return self._obs(), float(info["success"]), bool(info["success"]), False, info

    def evaluate(self):
        lifted = bool(self.tcp.pose.p[2] - self.z0 > 0.05)
        self.episode_stats["moved_up"] = self.episode_stats["moved_up"] or lifted
        success = lifted and (self.KIND != "apple" or self.cur_subtask_id == 1)
        return {"success": success, "episode_stats": dict(self.episode_stats), "lifted_object": lifted}

    # -- observation layout --------------------------------------------------------------
    def _obs(self):
        if not self.make_kwargs["obs_mode"] or "rgbd" not in self.make_kwargs["obs_mode"]:
            raise ValueError("the fake only implements obs_mode='rgbd' (what SIMPLER evaluation uses)")
        cam, h, w = CAMERA[self.ROBOT]
        rgb = np.zeros((h, w, 3), np.uint8)
        rgb[..., 0] = 40 * (1 + self.cur_subtask_id)
        row = int(np.clip(h / 2 - (self.tcp.pose.p[2] - self.z0) * 1000, 0, h - 8))
        rgb[row:row + 8, w // 2 - 4:w // 2 + 4] = 255  # TCP marker: moves up in the image
        def camera(hh, ww):
            return {"rgb": rgb if hh == h else np.zeros((hh, ww, 3), np.uint8),
                    "depth": np.ones((hh, ww, 1), np.float32),
                    "Segmentation": np.zeros((hh, ww, 4), np.uint32)}
        base = self.agent.robot.pose
        obs = {"agent": {"qpos": self.agent.robot.get_qpos(), "qvel": np.zeros_like(self.agent.robot.qpos),
                         "controller": {"arm": {"target_pose": np.concatenate([self.tcp.pose.p, self.tcp.pose.q])}}
                         if self.ROBOT == "widowx" else {"gripper": {"target_qpos": self.agent.robot.qpos[-2:].copy()}},
                         "base_pose": np.concatenate([base.p, base.q])},
               "extra": {"_": np.zeros(0)} if self.KIND in ("drawer", "apple") else {"tcp_pose": np.concatenate([self.tcp.pose.p, self.tcp.pose.q])},
               "camera_param": {c: {"extrinsic_cv": np.eye(4)[:3], "cam2world_gl": np.eye(4),
                                    "intrinsic_cv": np.eye(3)} for c in (cam, "base_camera")},
               "image": {cam: camera(h, w), "base_camera": camera(128, 128)}}
        return obs


class FakeAppleEnv(FakeSceneEnv):
    KIND = "apple"
    INSTRUCTIONS = ("open top drawer", "place apple into top drawer")

    def is_final_subtask(self):
        return self.cur_subtask_id == 1

    def advance_to_next_subtask(self):
        self.cur_subtask_id = 1


def _make_class(name, kind, robot, instruction):
    return type(name, (FakeSceneEnv,), {"KIND": kind, "ROBOT": robot, "INSTRUCTIONS": (instruction,)})


_ENVS = {  # id -> (kind, robot, instruction, registered max steps)
    "GraspSingleOpenedCokeCanInScene-v0": ("grasp", "google", "pick coke can", 80),
    "GraspSingleOpenedCokeCanDistractorInScene-v0": ("grasp_distractor", "google", "pick coke can", 80),
    "GraspSingleRandomObjectInScene-v0": ("grasp", "google", "pick object", 80),
    "MoveNearGoogleBakedTexInScene-v0": ("move_near", "google", "move blue plastic bottle near pepsi can", 80),
    "MoveNearGoogleBakedTexInScene-v1": ("move_near_v1", "google", "move blue plastic bottle near pepsi can", 80),
    "MoveNearGoogleInScene-v0": ("move_near", "google", "move blue plastic bottle near pepsi can", 80),
    "PutSpoonOnTableClothInScene-v0": ("bridge", "widowx", "put the spoon on the towel", 60),
    "PutCarrotOnPlateInScene-v0": ("bridge", "widowx", "put carrot on plate", 60),
    "StackGreenCubeOnYellowCubeBakedTexInScene-v0": ("bridge", "widowx", "stack the green block on the yellow block", 60),
    "PutEggplantInBasketScene-v0": ("bridge", "widowx", "put eggplant into yellow basket", 120),
}
for _verb in ("Open", "Close"):
    _ENVS[f"{_verb}DrawerCustomInScene-v0"] = ("drawer", "google", f"{_verb.lower()} middle drawer", 113)
    for _d in ("Top", "Middle", "Bottom"):
        _ENVS[f"{_verb}{_d}DrawerCustomInScene-v0"] = ("drawer", "google", f"{_verb.lower()} {_d.lower()} drawer", 113)
_PLACE = {f"PlaceIntoClosed{d}DrawerCustomInScene-v0": d.lower() or "top" for d in ("", "Top", "Middle", "Bottom")}


def register() -> None:
    for env_id, (kind, robot, instr, steps) in _ENVS.items():
        full = f"{GYM_NAMESPACE}/{env_id}"
        if full not in gym.envs.registry:
            cls = _make_class(env_id.split("-")[0], kind, robot, instr)
            gym.register(id=full, entry_point=cls, max_episode_steps=steps)
    for env_id, drawer in _PLACE.items():
        full = f"{GYM_NAMESPACE}/{env_id}"
        if full not in gym.envs.registry:
            cls = type(env_id.split("-")[0], (FakeAppleEnv,),
                       {"INSTRUCTIONS": (f"open {drawer} drawer", f"place apple into {drawer} drawer")})
            gym.register(id=full, entry_point=cls, max_episode_steps=200)


register()
