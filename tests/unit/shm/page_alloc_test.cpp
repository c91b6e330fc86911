#include <doctest/doctest.h>

#include <random>
#include <vector>

#include "shm/page_alloc.hpp"

using namespace shmalloc;

namespace {
// A page_alloc over process memory, with a plain vector<bool> as the model.
struct fixture {
  explicit fixture(std::uint32_t leaves) : bits(leaves), tree(2 * leaves), pa(bits.data(), tree.data(), leaves) {
    pa.init();
  }
  std::vector<std::uint64_t> bits;
  std::vector<page_summary> tree;
  page_alloc pa;
};

std::uint32_t model_find(const std::vector<bool>& used, std::uint32_t n) {
  std::uint32_t run = 0;
  for (std::uint32_t p = 0; p < used.size(); ++p) {
    run = used[p] ? 0 : run + 1;
    if (run == n) return p + 1 - n;
  }
  return page_id::nil_value;
}
}  // namespace

TEST_SUITE("page_alloc") {
  TEST_CASE("a new index has no free page") {
    fixture f(8);
    CHECK(f.pa.count_free() == 0);
    CHECK_FALSE(f.pa.find(1));
    CHECK(f.pa.verify(nullptr));
  }

  TEST_CASE("first fit returns the lowest run, also across word and subtree boundaries") {
    fixture f(8);  // 512 pages
    f.pa.mark_free(page_id{0}, 512);
    f.pa.mark_in_use(page_id{0}, 60);  // free run 60..511
    CHECK(f.pa.find(1).value == 60);
    CHECK(f.pa.find(10).value == 60);  // straddles words 0 and 1
    f.pa.mark_in_use(page_id{100}, 1);
    CHECK(f.pa.find(41).value == 101);  // 60..99 is only 40 long
    CHECK(f.pa.find(40).value == 60);
    CHECK(f.pa.find(411).value == 101);
    CHECK_FALSE(f.pa.find(412));
    CHECK(f.pa.verify(nullptr));
  }

  TEST_CASE("freeing neighbours coalesces into one run") {
    fixture f(4);
    f.pa.mark_free(page_id{0}, 256);
    f.pa.mark_in_use(page_id{0}, 256);
    f.pa.mark_free(page_id{10}, 5);
    f.pa.mark_free(page_id{20}, 5);
    CHECK(f.pa.longest_free_run() == 5);
    f.pa.mark_free(page_id{15}, 5);
    CHECK(f.pa.longest_free_run() == 15);
    CHECK(f.pa.find(15).value == 10);
    CHECK(f.pa.verify(nullptr));
  }

  TEST_CASE("random allocation and free agree with a brute-force model") {
    fixture f(64);  // 4096 pages
    std::vector<bool> used(4096, false);
    f.pa.mark_free(page_id{0}, 4096);
    std::mt19937 rng(42);
    std::vector<std::pair<std::uint32_t, std::uint32_t>> live;
    for (int step = 0; step < 4000; ++step) {
      if (live.empty() || rng() % 3 != 0) {
        const std::uint32_t n = rng() % 8 == 0 ? 1 + rng() % 300 : 1 + rng() % 10;
        const page_id got = f.pa.find(n);
        REQUIRE(got.value == model_find(used, n));
        if (!got) continue;
        f.pa.mark_in_use(got, n);
        for (std::uint32_t p = got.value; p < got.value + n; ++p) used[p] = true;
        live.emplace_back(got.value, n);
      } else {
        const std::size_t k = rng() % live.size();
        f.pa.mark_free(page_id{live[k].first}, live[k].second);
        for (std::uint32_t p = live[k].first; p < live[k].first + live[k].second; ++p) used[p] = false;
        live.erase(live.begin() + static_cast<std::ptrdiff_t>(k));
      }
    }
    std::string why;
    CHECK_MESSAGE(f.pa.verify(&why), why);
  }

  TEST_CASE("the checker notices a summary that disagrees with the bitmap") {
    fixture f(4);
    f.pa.mark_free(page_id{0}, 256);
    f.bits[2] = 0xff;  // changed behind the index's back
    std::string why;
    CHECK_FALSE(f.pa.verify(&why));
    CHECK(why.find("leaf 2") != std::string::npos);
  }
}
