package blobstore

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"
	"runtime/debug"
	"sort"
	"strconv"
	"strings"
	"sync"

	"golang.org/x/sys/unix"

	"tvixfarm/cas/digest"
)

// Small CAS blobs are appended to pack files rather than stored as a file
// each: creating, writing and renaming a file costs tens of microseconds,
// appending a record one write(2). A pack is a sequence of records:
//
//	magic   [4]byte "TFP1"
//	fn      uint8   digest function
//	_       [3]byte zero
//	size    uint32  data length
//	hash    [32]byte
//	crc     uint32  CRC-32C of the 44 bytes above
//	data    [size]byte
//
// Packs are filled one at a time and evicted whole, oldest first; a blob
// that is used while its pack is among the oldest is copied into the
// current pack ("refreshed"), which makes eviction LRU-like, as in
// Buildbarn's local blob access. A crash can only tear the last record of
// the current pack; opening the store truncates it away. Record data is
// verified against its digest on every read.

const (
	packMagic     = "TFP1"
	packHeaderLen = 48
)

var crcTable = crc32.MakeTable(crc32.Castagnoli)

// pack is one pack file.
type pack struct {
	id      uint64
	f       *os.File
	size    int64        // bytes written
	recs    []packRecord // records, in order (for eviction and the pack index)
	idxSize int64        // bytes of its index file, counted in the store's size
	sealed  uint64       // use clock when the pack stopped taking writes; 0 while current
	gone    bool         // evicted

	// Records are read through a read-only shared mapping of the file:
	// a read is then a copy, not a system call (which costs microseconds
	// on virtual machines). The mapping covers the most the pack can grow
	// to; only records already written (and indexed) are ever read.
	// mapMu keeps the mapping alive while it is read.
	mapMu sync.RWMutex
	data  []byte
}

// mapPack maps a pack file for reading, for up to length bytes. Without a
// mapping, records are read with pread.
func (p *pack) mapPack(length int64) {
	if length <= 0 {
		return
	}
	length = (length + 4095) &^ 4095
	data, err := unix.Mmap(int(p.f.Fd()), 0, int(length), unix.PROT_READ, unix.MAP_SHARED)
	if err == nil {
		p.data = data
	}
}

// close unmaps and closes the pack, waiting for readers of the mapping.
func (p *pack) close() {
	p.mapMu.Lock()
	if p.data != nil {
		unix.Munmap(p.data)
		p.data = nil
	}
	p.mapMu.Unlock()
	p.f.Close()
}

// read copies the record data at off into buf.
func (p *pack) read(buf []byte, off int64) error {
	p.mapMu.RLock()
	defer p.mapMu.RUnlock()
	if p.data == nil {
		_, err := p.f.ReadAt(buf, off)
		return err
	}
	if off+int64(len(buf)) > int64(len(p.data)) {
		return fmt.Errorf("record at %d beyond the mapping", off)
	}
	return copyMapped(buf, p.data[off:])
}

var errMappingFault = errors.New("pack file shrank under its mapping")

// copyMapped copies from a file mapping. If the file was truncated behind
// the store's back, the access faults (SIGBUS); that becomes an error here
// instead of a crash.
func copyMapped(dst, src []byte) (err error) {
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("%w: %v", errMappingFault, r)
		}
	}()
	copy(dst, src)
	return nil
}

func packName(id uint64) string { return fmt.Sprintf("%016d.pack", id) }

func indexName(id uint64) string { return fmt.Sprintf("%016d.idx", id) }

// A pack index lists the records of a sealed pack, so that opening the
// store reads a few bytes per record instead of the whole pack:
//
//	magic  [4]byte "TFX1"
//	size   uint64  size of the pack file it describes
//	count  uint32
//	count × { fn uint8, hash [32]byte, size uint32, off uint64 }  (off of the data)
//	crc    uint32  CRC-32C of everything above
//
// It is written (to a temporary name, then renamed) when the pack is
// sealed; a missing, stale or damaged index just means the pack is scanned.
const (
	indexMagic     = "TFX1"
	indexRecordLen = 1 + digest.HashSize + 4 + 8
)

func encodeIndex(size int64, recs []packRecord) []byte {
	b := make([]byte, 0, 16+len(recs)*indexRecordLen+4)
	b = append(b, indexMagic...)
	b = binary.LittleEndian.AppendUint64(b, uint64(size))
	b = binary.LittleEndian.AppendUint32(b, uint32(len(recs)))
	for _, r := range recs {
		h := r.d.Hash()
		b = append(b, byte(r.d.Function()))
		b = append(b, h[:]...)
		b = binary.LittleEndian.AppendUint32(b, uint32(r.d.Size()))
		b = binary.LittleEndian.AppendUint64(b, uint64(r.off))
	}
	return binary.LittleEndian.AppendUint32(b, crc32.Checksum(b, crcTable))
}

// decodeIndex parses a pack index for a pack of packSize bytes.
func decodeIndex(b []byte, packSize int64) ([]packRecord, bool) {
	if len(b) < 20 || string(b[:4]) != indexMagic {
		return nil, false
	}
	body, sum := b[:len(b)-4], binary.LittleEndian.Uint32(b[len(b)-4:])
	if crc32.Checksum(body, crcTable) != sum || int64(binary.LittleEndian.Uint64(body[4:])) != packSize {
		return nil, false
	}
	n := int(binary.LittleEndian.Uint32(body[12:]))
	if len(body) != 16+n*indexRecordLen {
		return nil, false
	}
	recs := make([]packRecord, n)
	for i := range recs {
		r := body[16+i*indexRecordLen:]
		fn := digest.Function(r[0])
		if fn != digest.SHA256 && fn != digest.BLAKE3 {
			return nil, false
		}
		var h [digest.HashSize]byte
		copy(h[:], r[1:])
		size := int64(binary.LittleEndian.Uint32(r[1+digest.HashSize:]))
		off := int64(binary.LittleEndian.Uint64(r[5+digest.HashSize:]))
		if off < packHeaderLen || off+size > packSize {
			return nil, false
		}
		recs[i] = packRecord{d: digest.New(fn, h, size), off: off}
	}
	return recs, true
}

// writeIndex writes the index of sealed pack p, whose records are recs.
func (s *disk) writeIndex(p *pack, size int64, recs []packRecord) {
	name := filepath.Join(s.packDir(), indexName(p.id))
	tmp := name + ".tmp"
	b := encodeIndex(size, recs)
	if err := os.WriteFile(tmp, b, 0o644); err != nil {
		os.Remove(tmp)
		s.opts.Logger.Warn("disk store: pack index not written; the pack will be scanned at start", "pack", p.id, "err", err)
		return
	}
	if err := os.Rename(tmp, name); err != nil {
		os.Remove(tmp)
		return
	}
	s.mu.Lock()
	if p.gone {
		os.Remove(name) // evicted meanwhile
	} else {
		p.idxSize = int64(len(b))
		s.size += p.idxSize
	}
	s.mu.Unlock()
}

// readIndex returns the records of pack id from its index, if the index is
// intact and describes the pack as it is (packSize bytes).
func (s *disk) readIndex(id uint64, packSize int64) ([]packRecord, int64, bool) {
	b, err := os.ReadFile(filepath.Join(s.packDir(), indexName(id)))
	if err != nil {
		return nil, 0, false
	}
	recs, ok := decodeIndex(b, packSize)
	return recs, int64(len(b)), ok
}

func encodeRecord(d digest.Digest, data []byte) []byte {
	rec := make([]byte, packHeaderLen+len(data))
	copy(rec, packMagic)
	rec[4] = byte(d.Function())
	binary.LittleEndian.PutUint32(rec[8:], uint32(len(data)))
	h := d.Hash()
	copy(rec[12:44], h[:])
	binary.LittleEndian.PutUint32(rec[44:], crc32.Checksum(rec[:44], crcTable))
	copy(rec[packHeaderLen:], data)
	return rec
}

// decodeHeader parses a record header; ok is false for anything that is
// not an intact header.
func decodeHeader(h []byte) (d digest.Digest, ok bool) {
	if len(h) < packHeaderLen || string(h[:4]) != packMagic ||
		binary.LittleEndian.Uint32(h[44:]) != crc32.Checksum(h[:44], crcTable) {
		return digest.Digest{}, false
	}
	fn := digest.Function(h[4])
	if fn != digest.SHA256 && fn != digest.BLAKE3 {
		return digest.Digest{}, false
	}
	var hash [digest.HashSize]byte
	copy(hash[:], h[12:44])
	return digest.New(fn, hash, int64(binary.LittleEndian.Uint32(h[8:]))), true
}

type packRecord struct {
	d   digest.Digest
	off int64 // of the data
}

// scanPack reads the records of a pack file and returns them with the
// length of the intact prefix.
func scanPack(f *os.File) ([]packRecord, int64, error) {
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		return nil, 0, err
	}
	br := bufio.NewReaderSize(f, 1<<20)
	var recs []packRecord
	var off int64
	hdr := make([]byte, packHeaderLen)
	for {
		if _, err := io.ReadFull(br, hdr); err != nil {
			return recs, off, nil // end, or a torn header
		}
		d, ok := decodeHeader(hdr)
		if !ok {
			return recs, off, nil
		}
		if n, err := br.Discard(int(d.Size())); err != nil || int64(n) != d.Size() {
			return recs, off, nil // torn data
		}
		recs = append(recs, packRecord{d: d, off: off + packHeaderLen})
		off += packHeaderLen + d.Size()
	}
}

// listPacks returns the ids of the pack files in dir, oldest first.
func listPacks(dir string) ([]uint64, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	var ids []uint64
	for _, e := range ents {
		name, ok := strings.CutSuffix(e.Name(), ".pack")
		if !ok {
			continue
		}
		id, err := strconv.ParseUint(name, 10, 64)
		if err != nil {
			continue
		}
		ids = append(ids, id)
	}
	sort.Slice(ids, func(i, j int) bool { return ids[i] < ids[j] })
	return ids, nil
}

func (s *disk) packDir() string { return filepath.Join(s.dir, "packs") }

func (s *disk) createPack(id uint64) (*pack, error) {
	f, err := os.OpenFile(filepath.Join(s.packDir(), packName(id)), os.O_CREATE|os.O_RDWR|os.O_EXCL, 0o644)
	if err != nil {
		return nil, err
	}
	p := &pack{id: id, f: f}
	p.mapPack(s.opts.PackSize + s.opts.PackBelow + packHeaderLen)
	return p, nil
}

// readRecord reads and verifies the data of a packed blob.
func (s *disk) readRecord(p *pack, off int64, d digest.Digest) ([]byte, error) {
	buf := make([]byte, d.Size())
	if err := p.read(buf, off); err != nil {
		if errors.Is(err, os.ErrClosed) {
			return nil, NotFound(s.kind, d) // evicted meanwhile
		}
		if errors.Is(err, errMappingFault) {
			s.corrupt(d, err.Error())
			return nil, NotFound(s.kind, d)
		}
		return nil, ioError(err, "read blob %s", d)
	}
	if err := d.Verify(buf); err != nil {
		s.corrupt(d, "pack record: "+err.Error())
		return nil, NotFound(s.kind, d)
	}
	return buf, nil
}
