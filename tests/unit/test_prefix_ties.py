"""prefix_ties: a value is copied from the lowest-index row that shares its prefix."""
import torch

from metastone_lab.prefix_ties import prefix_sources, share_prefix_values


def test_sources_follow_the_shared_prefix():
    ids = torch.tensor([[5, 1, 2, 3],
                        [5, 1, 2, 4],     # shares columns 0-2 with row 0
                        [5, 7, 2, 3],     # shares column 0 only
                        [5, 1, 2, 4]])    # identical to row 1
    assert prefix_sources(ids).tolist() == [[0, 0, 0, 0],
                                            [0, 0, 0, 1],
                                            [0, 2, 2, 2],
                                            [0, 0, 0, 1]]
    # a value that also depends on the next token: shared one column less
    assert prefix_sources(ids, through=1).tolist() == [[0, 0, 0, 0],
                                                       [0, 0, 1, 1],
                                                       [2, 2, 2, 2],
                                                       [0, 0, 1, 1]]


def test_values_of_a_shared_prefix_become_equal_and_others_stay():
    ids = torch.tensor([[5, 1, 2, 3], [5, 1, 9, 3]])
    v = torch.tensor([[0.5, 0.25, 1.0, 2.0], [0.5 + 1e-7, 0.25 - 1e-7, 3.0, 4.0]])
    out = share_prefix_values(v, prefix_sources(ids))
    assert out.tolist() == [[0.5, 0.25, 1.0, 2.0], [0.5, 0.25, 3.0, 4.0]]
    nan = float("nan")
    v = torch.tensor([[nan, 1.0, nan, nan], [nan, 2.0, 3.0, nan]])   # right padding
    out = share_prefix_values(v, prefix_sources(torch.tensor([[5, 1, 0, 0], [5, 1, 2, 0]])))
    assert out[1, 1] == 1.0 and out[1, 2] == 3.0 and torch.isnan(out[0, 2])


def test_sources_equal_the_definition_on_random_prefix_trees():
    """Brute force: the lowest s whose first j + 1 + through ids equal row r's."""
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        R, L = 9, 14
        ids = torch.randint(0, 3, (R, L), generator=g)      # 3 symbols: many shared prefixes
        ids[:, :trial % 5] = 7                             # a shared "prompt" of 0-4 columns
        ids[4] = ids[2]                                    # an exact duplicate
        for through in (0, 1, 2):
            want = [[min(s for s in range(R) if torch.equal(
                ids[s, :min(j + 1 + through, L)], ids[r, :min(j + 1 + through, L)]))
                for j in range(L)] for r in range(R)]
            assert prefix_sources(ids, through).tolist() == want
