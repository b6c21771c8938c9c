# Installs the freshly linked runtime library over the one processes may have mapped:
# copy to a temporary name in the destination directory, then rename(2) it over the target.
# Writing the target in place (cmake -E copy, distutils copy_file) would change the pages
# of a library that running processes have mmap'ed (SIGBUS / wrong code); a rename leaves
# their inode untouched and only new loads see the new file. (CMake >= 3.20: no
# file(COPY_FILE) / file(RENAME ... RESULT), so both steps go through cmake -E.)
#   cmake -DSRC=<built .so> -DDST=<installed .so> -P atomic_install.cmake
if(NOT SRC OR NOT DST)
  message(FATAL_ERROR "atomic_install.cmake needs -DSRC=... -DDST=...")
endif()
get_filename_component(_dir "${DST}" DIRECTORY)
get_filename_component(_name "${DST}" NAME)
file(MAKE_DIRECTORY "${_dir}")
string(RANDOM LENGTH 12 _rand)
set(_tmp "${_dir}/.${_name}.tmp-${_rand}")
execute_process(COMMAND "${CMAKE_COMMAND}" -E copy "${SRC}" "${_tmp}" RESULT_VARIABLE _rc)
if(NOT _rc EQUAL 0)
  file(REMOVE "${_tmp}")
  message(FATAL_ERROR "copying ${SRC} to ${_tmp} failed: ${_rc}")
endif()
execute_process(COMMAND "${CMAKE_COMMAND}" -E rename "${_tmp}" "${DST}" RESULT_VARIABLE _rc)
if(NOT _rc EQUAL 0)
  file(REMOVE "${_tmp}")
  message(FATAL_ERROR "renaming ${_tmp} over ${DST} failed: ${_rc}")
endif()
