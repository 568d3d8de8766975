// The pybind11 surface of async_ckpt._native (contract: async_ckpt/_native.pyi). It only
// binds: buffers are requested under the GIL, every blocking call runs with the GIL
// released, and core exceptions are translated to async_ckpt.errors classes.
#include <pybind11/pybind11.h>
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <climits>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "crc32c.h"
#include "crc32c_pieces.h"
#include "cuda_crc_dl.h"
#include "errors.h"
#include "file_io.h"
#include "gate.h"
#include "huge_pages.h"
#include "reader.h"
#include "shuffle.h"
#include "stage.h"
#include "writer.h"
#include "zstd_dl.h"

namespace py = pybind11;
using namespace ackpt;

namespace {

constexpr size_t kReleaseGilAbove = 64 << 10;  // small crc/shuffle calls keep the GIL

py::object err_class(const char* name) {
  return py::module_::import("async_ckpt.errors").attr(name);
}

[[noreturn]] void raise_format(const std::string& msg) { throw FormatError(msg); }

// Python int -> uint64 with a FormatError (not TypeError/OverflowError) for lying values.
uint64_t to_u64(const py::handle& h, const char* what, uint64_t max = UINT64_MAX) {
  if (!py::isinstance<py::int_>(h) || py::isinstance<py::bool_>(h))
    raise_format(std::string(what) + " must be an int");
  const py::int_ v = py::reinterpret_borrow<py::int_>(h);
  if (v < py::int_(0)) raise_format(std::string(what) + " must be >= 0");
  int overflow = 0;
  const long long s = PyLong_AsLongLongAndOverflow(v.ptr(), &overflow);
  unsigned long long u;
  if (overflow) {
    u = PyLong_AsUnsignedLongLong(v.ptr());
    if (PyErr_Occurred()) {
      PyErr_Clear();
      raise_format(std::string(what) + " is too large");
    }
  } else {
    u = static_cast<unsigned long long>(s);
  }
  if (u > max) raise_format(std::string(what) + " is too large: " + std::to_string(u));
  return u;
}

int64_t to_i64(const py::handle& h, const char* what) {
  if (!py::isinstance<py::int_>(h) || py::isinstance<py::bool_>(h))
    raise_format(std::string(what) + " must be an int");
  int overflow = 0;
  const long long s = PyLong_AsLongLongAndOverflow(h.ptr(), &overflow);
  if (overflow) raise_format(std::string(what) + " is out of range");
  return s;
}

py::buffer_info request(const py::handle& obj, bool writable, const char* what) {
  if (!PyObject_CheckBuffer(obj.ptr()))
    raise_format(std::string(what) + " does not support the buffer protocol");
  py::buffer_info info;
  try {
    info = py::reinterpret_borrow<py::buffer>(obj).request(writable);
  } catch (py::error_already_set& e) {
    raise_format(std::string(what) + ": " + e.what());
  } catch (const std::exception& e) {
    raise_format(std::string(what) + ": " + e.what());
  }
  // Contiguity: request() asks for PyBUF_STRIDES; accept only C-contiguous byte ranges.
  py::ssize_t expect = info.itemsize;
  for (py::ssize_t d = info.ndim - 1; d >= 0; --d) {
    if (info.shape[d] > 1 && info.strides[d] != expect)
      raise_format(std::string(what) + " must be C-contiguous");
    expect *= info.shape[d];
  }
  return info;
}

size_t nbytes(const py::buffer_info& b) { return static_cast<size_t>(b.size * b.itemsize); }

using U64Array = py::array_t<uint64_t, py::array::c_style | py::array::forcecast>;

// Parallel arrays of source addresses, destination offsets and lengths as staging regions.
std::vector<Region> to_regions(const U64Array& srcs, const U64Array& offsets, const U64Array& lengths,
                               const char* what) {
  const py::ssize_t n = srcs.size();
  if (offsets.size() != n || lengths.size() != n)
    raise_format(std::string(what) + ": srcs, offsets and lengths must have the same length");
  std::vector<Region> regions(static_cast<size_t>(n));
  const uint64_t* s = srcs.data();
  const uint64_t* o = offsets.data();
  const uint64_t* l = lengths.data();
  for (py::ssize_t k = 0; k < n; ++k)
    regions[k] = Region{reinterpret_cast<const void*>(static_cast<uintptr_t>(s[k])), o[k], l[k]};
  return regions;
}

// ReadJob.pieces -> ReadPiece list; the buffers stay requested in `held` while the read runs.
std::vector<ReadPiece> to_read_pieces(const py::object& pieces, std::vector<py::buffer_info>& held) {
  std::vector<ReadPiece> out;
  for (const py::handle& item : pieces) {
    if (!py::isinstance<py::tuple>(item) || py::len(item) != 2)
      raise_format("ReadJob.pieces: each piece must be a (dst, backup) tuple");
    const py::tuple pair = py::reinterpret_borrow<py::tuple>(item);
    held.push_back(request(pair[0], true, "ReadJob piece dst"));
    ReadPiece p;
    p.dst = static_cast<char*>(held.back().ptr);
    p.len = nbytes(held.back());
    if (!pair[1].is_none()) {
      held.push_back(request(pair[1], true, "ReadJob piece backup"));
      if (nbytes(held.back()) != p.len) raise_format("ReadJob piece backup must be as long as its dst");
      p.backup = static_cast<char*>(held.back().ptr);
      const char *a = p.dst, *b = p.backup;
      if (a < b + p.len && b < a + p.len) raise_format("ReadJob piece backup overlaps its dst");
    }
    out.push_back(p);
  }
  return out;
}

struct PyWriteJob {
  py::object src;
  uint32_t file;
  int codec, level, shuffle;
};

// (n, 4) uint64 rows [src, len, offset, chunk] -> pieces, FormatError on a bad shape.
std::vector<crcmath::Piece> to_pieces(
    const py::array_t<uint64_t, py::array::c_style | py::array::forcecast>& rows) {
  if (rows.ndim() != 2 || rows.shape(1) != 4) raise_format("pieces must be an (n, 4) uint64 array");
  std::vector<crcmath::Piece> pieces(static_cast<size_t>(rows.shape(0)));
  const uint64_t* r = rows.data();
  for (size_t i = 0; i < pieces.size(); ++i, r += 4) {
    if (r[3] > UINT32_MAX) raise_format("piece chunk index too large");
    pieces[i] = crcmath::Piece{r[0], r[1], r[2], static_cast<uint32_t>(r[3])};
  }
  return pieces;
}

struct PyReadJob {
  ChunkRecord rec;
  py::object dst;
  py::object pieces;  // None, or a sequence of (dst, backup-or-None) buffer pairs
  int64_t chunk;
};

}  // namespace

PYBIND11_MODULE(_native, m) {
  m.doc() = "async_ckpt native core: crc32c, byte-shuffle, zstd (dlopen), parallel chunk IO";

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const ChecksumError& e) {
      py::object exc = err_class("ChecksumError")(
          e.what(), e.path(), e.offset(), e.chunk() >= 0 ? py::object(py::int_(e.chunk())) : py::none());
      PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(exc.ptr())), exc.ptr());
    } catch (const IoError& e) {
      py::object exc = err_class("StorageError")(e.err(), e.detail(), e.path());
      PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(exc.ptr())), exc.ptr());
    } catch (const FormatError& e) {
      PyErr_SetString(err_class("FormatError").ptr(), e.what());
    } catch (const CodecError& e) {
      PyErr_SetString(err_class("CodecError").ptr(), e.what());
    } catch (const Error& e) {
      PyErr_SetString(err_class("CheckpointError").ptr(), e.what());
    }
  });

  m.attr("CODEC_RAW") = int(kCodecRaw);
  m.attr("CODEC_ZSTD") = int(kCodecZstd);
  m.attr("CODEC_AUTO") = int(kCodecAuto);
  m.attr("MAX_RAW_LENGTH") = py::int_(kMaxRawLength);

  m.def(
      "crc32c",
      [](const py::object& data, const py::object& value) {
        const uint32_t v = static_cast<uint32_t>(to_u64(value, "value", UINT32_MAX));
        py::buffer_info b = request(data, false, "data");
        const size_t n = nbytes(b);
        if (n < kReleaseGilAbove) return crc32c(v, b.ptr, n);
        py::gil_scoped_release nogil;
        return crc32c(v, b.ptr, n);
      },
      py::arg("data"), py::arg("value") = 0);
  m.def("crc32c_hardware", &crc32c_hardware);

  auto shuffle_fn = [](bool forward) {
    return [forward](const py::object& src, const py::object& dst, int elem_size) {
      py::buffer_info s = request(src, false, "src");
      py::buffer_info d = request(dst, true, "dst");
      if (nbytes(s) != nbytes(d))
        raise_format("src and dst lengths differ: " + std::to_string(nbytes(s)) + " vs " +
                     std::to_string(nbytes(d)));
      if (elem_size <= 0) raise_format("elem_size must be 1, 2, 4 or 8");
      std::unique_ptr<py::gil_scoped_release> nogil;
      if (nbytes(s) >= kReleaseGilAbove) nogil = std::make_unique<py::gil_scoped_release>();
      if (forward)
        shuffle(s.ptr, d.ptr, nbytes(s), static_cast<size_t>(elem_size));
      else
        unshuffle(s.ptr, d.ptr, nbytes(s), static_cast<size_t>(elem_size));
    };
  };
  m.def("shuffle", shuffle_fn(true), py::arg("src"), py::arg("dst"), py::arg("elem_size"));
  m.def("unshuffle", shuffle_fn(false), py::arg("src"), py::arg("dst"), py::arg("elem_size"));

  m.def(
      "zstd_load",
      [](const std::optional<std::string>& path) { return zstd::load(path.value_or("")); },
      py::arg("path") = py::none(), py::call_guard<py::gil_scoped_release>());
  m.def("zstd_backend", []() -> std::optional<std::string> {
    std::string b = zstd::backend();
    if (b.empty()) return std::nullopt;
    return b;
  });
  m.def(
      "zstd_compress",
      [](const py::object& src, int level) {
        py::buffer_info s = request(src, false, "src");
        const size_t n = nbytes(s);
        if (n > kMaxRawLength) raise_format("input exceeds the 2 GiB chunk limit");
        std::string out;
        {
          py::gil_scoped_release nogil;
          Buf tmp;
          const size_t cap = zstd::compress_bound(n);
          char* p = tmp.ensure(cap);
          const size_t c = zstd::compress(s.ptr, n, p, cap, level);
          if (c == 0) throw CodecError("zstd compression failed: destination too small");
          out.assign(p, c);
        }
        return py::bytes(out);
      },
      py::arg("src"), py::arg("level") = 1);
  m.def(
      "zstd_decompress",
      [](const py::object& src, const py::object& dst) {
        py::buffer_info s = request(src, false, "src");
        py::buffer_info d = request(dst, true, "dst");
        py::gil_scoped_release nogil;
        zstd::decompress(s.ptr, nbytes(s), d.ptr, nbytes(d));
        return nbytes(d);
      },
      py::arg("src"), py::arg("dst"));

  py::class_<PyWriteJob>(m, "WriteJob")
      .def(py::init([](py::object src, const py::object& file, int codec, int level, int shuffle) {
             if (!PyObject_CheckBuffer(src.ptr()))
               raise_format("src does not support the buffer protocol");
             return PyWriteJob{std::move(src),
                               static_cast<uint32_t>(to_u64(file, "file", UINT32_MAX)), codec,
                               level, shuffle};
           }),
           py::arg("src"), py::arg("file"), py::arg("codec") = 0, py::arg("level") = 1,
           py::arg("shuffle") = 0)
      .def_readonly("src", &PyWriteJob::src)
      .def_readonly("file", &PyWriteJob::file)
      .def_readonly("codec", &PyWriteJob::codec)
      .def_readonly("level", &PyWriteJob::level)
      .def_readonly("shuffle", &PyWriteJob::shuffle);

  py::class_<ChunkRecord>(m, "ChunkRecord")
      .def_readonly("file", &ChunkRecord::file)
      .def_readonly("offset", &ChunkRecord::offset)
      .def_readonly("length", &ChunkRecord::length)
      .def_readonly("raw_length", &ChunkRecord::raw_length)
      .def_readonly("codec", &ChunkRecord::codec)
      .def_readonly("shuffle", &ChunkRecord::shuffle)
      .def_readonly("crc32c", &ChunkRecord::crc32c)
      .def_readonly("raw_crc32c", &ChunkRecord::raw_crc32c)
      .def("__repr__", [](const ChunkRecord& r) {
        return "ChunkRecord(file=" + std::to_string(r.file) + ", offset=" +
               std::to_string(r.offset) + ", length=" + std::to_string(r.length) +
               ", raw_length=" + std::to_string(r.raw_length) + ", codec=" +
               std::to_string(r.codec) + ", shuffle=" + std::to_string(r.shuffle) +
               ", crc32c=" + std::to_string(r.crc32c) + ", raw_crc32c=" +
               std::to_string(r.raw_crc32c) + ")";
      });

  py::class_<Gate>(m, "Gate")
      .def(py::init<>())
      .def("advance", &Gate::advance, py::arg("n"))
      .def("cancel", &Gate::cancel)
      .def_property_readonly("ready", &Gate::ready);

  m.def(
      "stage",
      [](const py::object& dst, const U64Array& srcs, const U64Array& offsets, const U64Array& lengths,
         const std::vector<uint64_t>& chunk_ends, Gate* gate, uint64_t floor, int threads) {
        if (threads < 1 || threads > 64) raise_format("stage: threads must be in [1, 64]");
        py::buffer_info d = request(dst, true, "dst");
        const std::vector<Region> regions = to_regions(srcs, offsets, lengths, "stage");
        char* base = static_cast<char*>(d.ptr);
        const uint64_t len = nbytes(d);
        py::gil_scoped_release nogil;
        stage_regions(base, len, regions, chunk_ends, gate, floor, static_cast<unsigned>(threads));
      },
      py::arg("dst"), py::arg("srcs"), py::arg("offsets"), py::arg("lengths"),
      py::arg("chunk_ends") = std::vector<uint64_t>(), py::arg("gate") = py::none(),
      py::arg("floor") = UINT64_MAX, py::arg("threads") = 1);

  m.def(
      "copy_all",
      [](const U64Array& srcs, const U64Array& dsts, const U64Array& lengths, int threads) {
        if (threads < 1 || threads > 64) raise_format("copy_all: threads must be in [1, 64]");
        const py::ssize_t n = srcs.size();
        if (dsts.size() != n || lengths.size() != n)
          raise_format("copy_all: srcs, dsts and lengths must have the same length");
        std::vector<Copy> copies(static_cast<size_t>(n));
        const uint64_t* s = srcs.data();
        const uint64_t* d = dsts.data();
        const uint64_t* l = lengths.data();
        for (py::ssize_t k = 0; k < n; ++k)
          copies[k] = Copy{reinterpret_cast<const void*>(static_cast<uintptr_t>(s[k])),
                           reinterpret_cast<void*>(static_cast<uintptr_t>(d[k])), l[k]};
        py::gil_scoped_release nogil;
        copy_all(copies, static_cast<unsigned>(threads));
      },
      py::arg("srcs"), py::arg("dsts"), py::arg("lengths"), py::arg("threads") = 1);

  py::class_<StageQueue>(m, "StageQueue")
      .def(py::init<>())
      .def(
          "submit",
          [](StageQueue& q, const py::object& dst, const U64Array& srcs, const U64Array& offsets,
             const U64Array& lengths) {
            py::buffer_info d = request(dst, true, "dst");
            q.submit(static_cast<char*>(d.ptr), nbytes(d), to_regions(srcs, offsets, lengths, "StageQueue.submit"));
          },
          py::arg("dst"), py::arg("srcs"), py::arg("offsets"), py::arg("lengths"))
      .def("wait", &StageQueue::wait, py::call_guard<py::gil_scoped_release>());

  py::class_<Writer>(m, "Writer")
      .def(py::init([](int threads, int nice) {
             if (threads < 1 || threads > 256) raise_format("threads must be in [1, 256]");
             if (nice < 0 || nice > 19) raise_format("nice must be in [0, 19]");
             return std::make_unique<Writer>(static_cast<unsigned>(threads), nice);
           }),
           py::arg("threads") = 4, py::arg("nice") = 0)
      .def_property_readonly("threads", &Writer::threads)
      .def(
          "write",
          [](Writer& w, const std::vector<std::string>& paths, const std::vector<PyWriteJob*>& pj,
             bool fsync, Gate* gate, const py::object& known_crcs, const py::object& known_flags,
             bool check_known) {
            std::vector<py::buffer_info> held;  // released with the GIL held (declared first)
            held.reserve(pj.size() + 2);
            const uint32_t* known = nullptr;
            const uint8_t* flags = nullptr;
            if (known_crcs.is_none() != known_flags.is_none())
              raise_format("known_crcs and known_flags go together");
            if (!known_crcs.is_none()) {
              held.push_back(request(known_crcs, false, "known_crcs"));
              if (held.back().itemsize != 4 || nbytes(held.back()) != 4 * pj.size())
                raise_format("known_crcs must hold one 4-byte word per job");
              known = static_cast<const uint32_t*>(held.back().ptr);
              held.push_back(request(known_flags, false, "known_flags"));
              if (held.back().itemsize != 1 || nbytes(held.back()) != pj.size())
                raise_format("known_flags must hold one byte per job");
              flags = static_cast<const uint8_t*>(held.back().ptr);
            }
            std::vector<WriteJob> jobs(pj.size());
            for (size_t i = 0; i < pj.size(); ++i) {
              if (!pj[i]) raise_format("jobs must not contain None");
              held.push_back(request(pj[i]->src, false, "WriteJob.src"));
              jobs[i].src = held.back().ptr;
              jobs[i].len = nbytes(held.back());
              jobs[i].file = pj[i]->file;
              jobs[i].codec = pj[i]->codec;
              jobs[i].level = pj[i]->level;
              jobs[i].shuffle = pj[i]->shuffle;
              if (known) {
                jobs[i].known_crc = known + i;
                jobs[i].known_flag = flags + i;
              }
            }
            py::gil_scoped_release nogil;
            return w.write(paths, jobs, fsync, gate, check_known);
          },
          py::arg("paths"), py::arg("jobs"), py::arg("fsync") = true,
          py::arg("gate") = py::none(), py::arg("known_crcs") = py::none(),
          py::arg("known_flags") = py::none(),
          py::arg("check_known") = false);

  py::class_<PyReadJob>(m, "ReadJob")
      .def(py::init([](const py::object& file, const py::object& offset, const py::object& length,
                       const py::object& raw_length, const py::object& codec,
                       const py::object& shuffle, const py::object& crc, const py::object& raw_crc,
                       py::object dst, const py::object& chunk, py::object pieces) {
             PyReadJob j;
             j.rec.file = static_cast<uint32_t>(to_u64(file, "file", UINT32_MAX));
             j.rec.offset = to_u64(offset, "offset", uint64_t(INT64_MAX));
             j.rec.length = to_u64(length, "length", uint64_t(INT64_MAX));
             j.rec.raw_length = to_u64(raw_length, "raw_length", uint64_t(INT64_MAX));
             j.rec.codec = static_cast<int>(to_u64(codec, "codec", 255));
             j.rec.shuffle = static_cast<int>(to_u64(shuffle, "shuffle", 255));
             j.rec.crc32c = static_cast<uint32_t>(to_u64(crc, "crc32c", UINT32_MAX));
             j.rec.raw_crc32c = static_cast<uint32_t>(to_u64(raw_crc, "raw_crc32c", UINT32_MAX));
             if (!dst.is_none() && !PyObject_CheckBuffer(dst.ptr()))
               raise_format("dst does not support the buffer protocol");
             j.dst = std::move(dst);
             j.chunk = to_i64(chunk, "chunk");
             if (!pieces.is_none()) {
               if (!j.dst.is_none()) raise_format("ReadJob takes dst or pieces, not both");
               if (!py::isinstance<py::sequence>(pieces) || py::isinstance<py::str>(pieces))
                 raise_format("pieces must be a sequence of (dst, backup) pairs");
             }
             j.pieces = std::move(pieces);
             return j;
           }),
           py::arg("file"), py::arg("offset"), py::arg("length"), py::arg("raw_length"),
           py::arg("codec"), py::arg("shuffle"), py::arg("crc32c"), py::arg("raw_crc32c"),
           py::arg("dst") = py::none(), py::arg("chunk") = -1, py::arg("pieces") = py::none())
      .def_property_readonly("file", [](const PyReadJob& j) { return j.rec.file; })
      .def_property_readonly("offset", [](const PyReadJob& j) { return j.rec.offset; })
      .def_property_readonly("length", [](const PyReadJob& j) { return j.rec.length; })
      .def_property_readonly("raw_length", [](const PyReadJob& j) { return j.rec.raw_length; })
      .def_property_readonly("codec", [](const PyReadJob& j) { return j.rec.codec; })
      .def_property_readonly("shuffle", [](const PyReadJob& j) { return j.rec.shuffle; })
      .def_property_readonly("crc32c", [](const PyReadJob& j) { return j.rec.crc32c; })
      .def_property_readonly("raw_crc32c", [](const PyReadJob& j) { return j.rec.raw_crc32c; })
      .def_readonly("dst", &PyReadJob::dst)
      .def_readonly("pieces", &PyReadJob::pieces)
      .def_readonly("chunk", &PyReadJob::chunk);

  py::class_<Reader>(m, "Reader")
      .def(py::init([](int threads) {
             if (threads < 1 || threads > 256) raise_format("threads must be in [1, 256]");
             return std::make_unique<Reader>(static_cast<unsigned>(threads));
           }),
           py::arg("threads") = 4)
      .def_property_readonly("threads", &Reader::threads)
      .def(
          "read",
          [](Reader& r, const std::vector<std::string>& paths, const std::vector<PyReadJob*>& pj,
             bool collect_errors) {
            std::vector<py::buffer_info> held;
            held.reserve(pj.size());
            std::vector<ReadJob> jobs(pj.size());
            for (size_t i = 0; i < pj.size(); ++i) {
              if (!pj[i]) raise_format("jobs must not contain None");
              jobs[i].rec = pj[i]->rec;
              jobs[i].chunk = pj[i]->chunk;
              if (!pj[i]->dst.is_none()) {
                held.push_back(request(pj[i]->dst, true, "ReadJob.dst"));
                jobs[i].dst = held.back().ptr;
                jobs[i].dst_len = nbytes(held.back());
              }
              if (!pj[i]->pieces.is_none()) jobs[i].pieces = to_read_pieces(pj[i]->pieces, held);
            }
            py::gil_scoped_release nogil;
            return r.read(paths, jobs, collect_errors);
          },
          py::arg("paths"), py::arg("jobs"), py::arg("collect_errors") = false);

  m.def("huge_page_size", &huge_page_size);
  m.def(
      "collapse_huge_pages",
      [](const py::object& buffer) {
        py::buffer_info b = request(buffer, true, "buffer");
        Collapse c;
        {
          py::gil_scoped_release nogil;
          c = collapse_huge_pages(b.ptr, nbytes(b));
        }
        return c == Collapse::kDone ? "done" : c == Collapse::kRetry ? "retry" : "unsupported";
      },
      py::arg("buffer"));
  m.def("fsync_dir", &fsync_dir, py::arg("path"), py::call_guard<py::gil_scoped_release>());
  m.def("fsync_file", &fsync_path, py::arg("path"), py::call_guard<py::gil_scoped_release>());
  using U64Array = py::array_t<uint64_t, py::array::c_style | py::array::forcecast>;
  m.def(
      "crc32c_pieces",
      [](const U64Array& pieces, const std::vector<uint64_t>& chunk_lens, uint64_t segment) {
        std::vector<crcmath::Piece> p = to_pieces(pieces);
        py::gil_scoped_release nogil;
        return crc32c_pieces(p, chunk_lens, segment);
      },
      py::arg("pieces"), py::arg("chunk_lens"), py::arg("segment") = 16384);
  m.def("cuda_crc_load", &cuda_crc::load, py::arg("path"), py::call_guard<py::gil_scoped_release>());
  m.def("cuda_crc_path", []() -> std::optional<std::string> {
    std::string p = cuda_crc::loaded_path();
    if (p.empty()) return std::nullopt;
    return p;
  });
  m.def("cuda_device_count", &cuda_crc::device_count, py::call_guard<py::gil_scoped_release>());
  m.def(
      "cuda_crc32c_pieces",
      [](const U64Array& pieces, const std::vector<uint64_t>& chunk_lens, const py::object& out,
         const py::object& workspace, uint64_t segment, uintptr_t stream, int device) {
        std::vector<crcmath::Piece> p = to_pieces(pieces);
        py::buffer_info o = request(out, true, "out");
        if (o.itemsize != 4 || nbytes(o) != 4 * chunk_lens.size())
          raise_format("out must hold one 4-byte word per chunk");
        py::buffer_info w = request(workspace, true, "workspace");
        auto* words = static_cast<uint32_t*>(o.ptr);
        void* ws = w.ptr;
        const size_t ws_len = nbytes(w);
        py::gil_scoped_release nogil;
        cuda_crc::launch(p, chunk_lens, words, segment, stream, device, ws, ws_len);
      },
      py::arg("pieces"), py::arg("chunk_lens"), py::arg("out"), py::arg("workspace"),
      py::arg("segment"), py::arg("stream"), py::arg("device"));
  m.def("cuda_crc_workspace_bytes", &cuda_crc::workspace_bytes, py::arg("n_pieces"),
        py::arg("n_chunks"));
  m.def(
      "cuda_crc32c_pieces_host",
      [](const U64Array& pieces, const std::vector<uint64_t>& chunk_lens, uint64_t segment) {
        std::vector<crcmath::Piece> p = to_pieces(pieces);
        py::gil_scoped_release nogil;
        return cuda_crc::host_reference(p, chunk_lens, segment);
      },
      py::arg("pieces"), py::arg("chunk_lens"), py::arg("segment") = 16384);

  m.def(
      "write_file_durable",
      [](const std::string& path, const py::object& data) {
        py::buffer_info b = request(data, false, "data");
        py::gil_scoped_release nogil;
        write_file_durable(path, b.ptr, nbytes(b));
      },
      py::arg("path"), py::arg("data"));
}
