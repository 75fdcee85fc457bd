# troupe_add_library(NAME SOURCES... [PUBLIC deps...] [PRIVATE deps...]): the static library of one
# folder. Every folder includes by repo-root paths ("engine/kv/block_pool.hpp"); which folder may
# include which is checked by scripts/check_layers.sh (runtime <- engine <- {cluster, http} <-
# actors <- cli), run by the test command.
function(troupe_add_library name)
  cmake_parse_arguments(ARG "" "" "SOURCES;PUBLIC;PRIVATE" ${ARGN})
  add_library(${name} STATIC ${ARG_SOURCES})
  target_link_libraries(${name} PUBLIC ${ARG_PUBLIC} PRIVATE ${ARG_PRIVATE})
endfunction()
