"""PettingZooTextGame and the shipped board games, on real PettingZoo envs."""

import importlib
import importlib.util

import numpy as np
import pytest
from pettingzoo.classic.connect_four import connect_four as connect_four_v3
from pettingzoo.classic.tictactoe import tictactoe as tictactoe_v3

from gigpo_torchrl.envs.game import InvalidAction
from gigpo_torchrl.envs.pettingzoo_adapter import PettingZooTextGame
from gigpo_torchrl.envs.registry import env_spec

# The installed name when the package is installed, else the source folder (importing both
# would register the games twice).
board_games = importlib.import_module(
    "gigpo_envs.board_games" if importlib.util.find_spec("gigpo_envs") else "envs.board_games"
)

GAMES = {"tictactoe": board_games.tictactoe, "connect_four": board_games.connect_four}


def first_legal(preferences):
    """An opponent that plays the first legal action of ``preferences``."""

    def choose(observation, action_mask, rng):
        return next(a for a in preferences if action_mask[a])

    return choose


def raw_position(make_env, actions):
    """A raw PettingZoo env after ``actions``; returns (env, observation, mask) for the mover."""
    env = make_env()
    env.reset(seed=0)
    for action in actions:
        env.step(action)
    obs, *_ = env.last()
    return env, obs["observation"], obs["action_mask"]


@pytest.mark.parametrize("name", GAMES)
@pytest.mark.parametrize("opponent", ["random", "heuristic"])
def test_same_seed_same_game(name, opponent):
    a, b = GAMES[name](opponent=opponent, player=1), GAMES[name](opponent=opponent, player=1)
    assert a.reset(7) == b.reset(7)
    assert a.state() == b.state()
    for _ in range(2):
        move = a.admissible_actions()[0]
        assert a.step(move) == b.step(move)
        assert a.state() == b.state()
    openings = {GAMES[name](player=1).reset(seed) for seed in range(10)}
    assert len(openings) > 1  # the random opponent's first move does depend on the seed


@pytest.mark.parametrize("name", GAMES)
@pytest.mark.parametrize("opponent", ["random", "heuristic"])
@pytest.mark.parametrize("seed", range(4))
def test_full_game_with_legal_moves(name, opponent, seed):
    game, rng = GAMES[name](opponent=opponent, player=seed % 2), np.random.default_rng(seed)
    game.reset(seed)
    for _ in range(25):
        result = game.step(str(rng.choice(game.admissible_actions())))
        if result.terminated:
            break
        assert result.reward == 0 and not result.success and "Legal moves:" in result.observation
    assert result.terminated and not result.truncated
    assert result.reward in (-1, 0, 1)
    assert result.success == (result.reward == 1)
    assert "Game over:" in result.observation and game.admissible_actions() == []
    with pytest.raises(RuntimeError):
        game.step("1")


def test_win_and_loss_rewards():
    game = board_games.tictactoe(opponent=first_legal([1, 2, 0]))  # cells 4, 7, 1
    game.reset(0)
    assert [game.step(cell).reward for cell in ["1", "5"]] == [0, 0]
    result = game.step("9")  # the 1-5-9 diagonal
    assert (result.reward, result.terminated, result.success) == (1, True, True)
    assert result.observation.endswith("Game over: you won.")
    game.reset(0)
    result = [game.step(cell) for cell in ["2", "3", "5"]][-1]  # O fills column 1
    assert (result.reward, result.terminated, result.success) == (-1, True, False)
    assert result.observation.endswith("Game over: you lost.")


def test_occupied_cell_is_invalid_and_changes_nothing():
    game = board_games.tictactoe(player=1)
    observation = game.reset(3)
    (taken,) = set("123456789") - set(game.admissible_actions())
    before = (game.state(), game.admissible_actions(), observation)
    with pytest.raises(InvalidAction, match="not legal"):
        game.step(taken)
    assert (game.state(), game.admissible_actions(), observation) == before


def test_full_column_is_invalid_and_changes_nothing():
    game = board_games.connect_four(opponent=first_legal(range(7)))
    game.reset(0)
    for _ in range(3):  # X and O alternate in column 1 until it is full: no one wins
        game.step("1")
    assert "1" not in game.admissible_actions()
    before = (game.state(), game.admissible_actions())
    with pytest.raises(InvalidAction, match="not legal"):
        game.step("1")
    assert (game.state(), game.admissible_actions()) == before
    assert not game.step("2").terminated  # the game goes on normally


@pytest.mark.parametrize(
    "text",
    ["", " ", "x" * 10_000, "1" * 10_000, "0", "10", "-1", "1.0", "+1", "one", "１", "٣", "①",
     "☃", "\x00", "1\x00", "\x1b[31m1", "1 2", "None", "cell 1"],
)  # fmt: skip
@pytest.mark.parametrize("name", GAMES)
def test_hostile_strings_are_invalid(name, text):
    game = GAMES[name]()
    game.reset(0)
    before = game.state()
    with pytest.raises(InvalidAction) as error:
        game.step(text)
    assert len(str(error.value)) < 200  # the message never echoes a huge input
    assert game.state() == before


@pytest.mark.parametrize("seed", range(5))
def test_tictactoe_heuristic_blocks_then_prefers_winning(seed):
    choose = board_games.heuristic_opponent(board_games._place_cell, 3)
    rng = np.random.default_rng(seed)
    # X on cells 1 and 2 (PettingZoo 0 and 3), O in the centre: O must block cell 3 (6)
    _, obs, mask = raw_position(tictactoe_v3.env, [0, 4, 3])
    assert choose(obs, mask, rng) == 6
    # X threatens cell 3 again, but O (cells 4, 5) wins on cell 6 (PettingZoo 7)
    _, obs, mask = raw_position(tictactoe_v3.env, [0, 4, 8, 1, 3])
    assert choose(obs, mask, rng) == 7


@pytest.mark.parametrize("seed", range(5))
def test_connect_four_heuristic_blocks_then_prefers_winning(seed):
    choose = board_games.heuristic_opponent(board_games._drop_piece, 4)
    rng = np.random.default_rng(seed)
    # X has columns 1-3 of the bottom row: O blocks column 4 (index 3)
    _, obs, mask = raw_position(connect_four_v3.env, [0, 6, 1, 6, 2])
    assert choose(obs, mask, rng) == 3
    # same threat, but O has three stacked in column 7 and wins there
    _, obs, mask = raw_position(connect_four_v3.env, [0, 6, 1, 6, 5, 6, 2])
    assert choose(obs, mask, rng) == 6
    # a vertical threat: X stacked three high in column 4
    _, obs, mask = raw_position(connect_four_v3.env, [3, 0, 3, 6, 3])
    assert choose(obs, mask, rng) == 3


def test_heuristic_opponent_blocks_inside_the_game():
    game = board_games.tictactoe(opponent="heuristic")
    game.reset(0)
    game.step("5")
    assert {"1", "9"} <= set(game.admissible_actions())  # seed 0: the opponent took neither
    # X holds the centre and the top left: the opponent must take the bottom right
    assert game.step("1").info["opponent_moves"] == [("player_2", "9")]


def test_transposed_move_orders_reach_the_same_state():
    def play(moves):
        game = board_games.tictactoe(opponent=first_legal([4, 3, 1, 5, 7, 2, 6]))
        game.reset(0)
        observations = [game.step(m).observation for m in moves]
        return game.state(), observations[-1]

    # X 1 then 9 against X 9 then 1; O answers centre, then cell 2, both times
    assert play(["1", "9"]) == play(["9", "1"])
    assert play(["1"])[0] != play(["9"])[0]


def test_render_orientation_matches_pettingzoo():
    env, *_ = raw_position(tictactoe_v3.env, [0, 1, 3])  # X top left, O middle left, X top middle
    assert board_games.render_tictactoe(env, 0) == "\n".join(
        [
            "You are X (player_1); your opponent is O (player_2). X moves first.",
            "Board (an empty cell shows its number):",
            "      col 1 col 2 col 3",
            "row 1   X  |  X  |  3",
            "      -----+-----+-----",
            "row 2   O  |  5  |  6",
            "      -----+-----+-----",
            "row 3   7  |  8  |  9",
        ]
    )
    env, *_ = raw_position(connect_four_v3.env, [3, 3, 0])
    assert board_games.render_connect_four(env, 1) == "\n".join(
        [
            "You are O (player_1); your opponent is X (player_0). X moves first.",
            "Board (. is empty; a piece drops to the lowest empty row of its column):",
            "     1 2 3 4 5 6 7",
            "  6 |. . . . . . .|",
            "  5 |. . . . . . .|",
            "  4 |. . . . . . .|",
            "  3 |. . . . . . .|",
            "  2 |. . . O . . .|",
            "  1 |X . . X . . .|",
            "     1 2 3 4 5 6 7",
        ]
    )


def test_action_names_reach_the_right_pettingzoo_action():
    game = board_games.tictactoe(opponent=first_legal([8]))
    game.reset(0)
    game.step("2")  # top middle: PettingZoo's square 3 (it numbers down the columns)
    assert game._env.unwrapped.board.squares == [0, 0, 0, 1, 0, 0, 0, 0, 2]
    game = board_games.connect_four(opponent=first_legal([6]))
    game.reset(0)
    game.step("1")
    assert game._env.unwrapped.board[35] == 1 and game._env.unwrapped.board[41] == 2  # bottom row


def test_user_callable_opponent_and_word_action_names():
    calls = []

    def lowest(observation, action_mask, rng):
        calls.append((observation.shape, action_mask.tolist(), type(rng)))
        return int(np.flatnonzero(action_mask)[0])

    names = ["a1", "a2", "a3", "b1", "b2", "b3", "c1", "c2", "c3"]
    game = PettingZooTextGame(
        tictactoe_v3.env, render=str, action_names=names, player="player_2", opponent=lowest
    )
    assert game.reset(0).startswith("player_1 played a1.")
    assert calls == [((3, 3, 2), [1] * 9, np.random.Generator)]
    assert game.admissible_actions() == names[1:]
    result = game.step("B2")  # names ignore case
    assert result.info["opponent_moves"] == [("player_1", "a2")]
    result = game.step("6")  # the bare action index: c1
    assert result.info["opponent_moves"] == [("player_1", "a3")]
    assert result.terminated and result.reward == -1 and not result.success  # a1 a2 a3 wins


def test_illegal_opponent_move_is_an_error():
    game = board_games.tictactoe(opponent=lambda observation, action_mask, rng: 0)
    game.reset(0)
    with pytest.raises(ValueError, match="illegal action"):
        game.step("1")


def test_registered_games():
    for name, max_steps in [("tictactoe", 10), ("connect_four", 30)]:
        spec = env_spec(name)
        assert spec.max_steps == max_steps and "reward +1 win" in spec.description
        game = spec.factory(opponent="heuristic", player=1)
        assert isinstance(game, PettingZooTextGame) and game.task
    with pytest.raises(ValueError, match="opponent"):
        board_games.tictactoe(opponent="minimax")
    with pytest.raises(ValueError, match="player"):
        board_games.connect_four(player=2)
