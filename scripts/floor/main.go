// Command floor measures what this machine can do at best, with nothing of
// tvixfarm in the way, so the farm's figures can be read against it
// (docs/BENCHMARKS.md, "Floors"). Client and server are two processes on
// loopback, as in every farmctl bench: the program starts its own server
// as a child process and stops it.
//
//	go run ./scripts/floor tcp [-hash none|sha256|blake3] [-pipe]
//	    100 MiB over raw TCP in 1 MiB writes, hashed by the receiver
//	    (in a second goroutine with -pipe): the floor under any
//	    verified ByteStream write.
//	go run ./scripts/floor bulk [-hash none|sha256|blake3]
//	    100 MiB down and up a plain grpc-go stream in 1 MiB messages
//	    (stock codec, the farm's window and buffer sizes), the upload
//	    hashed in a second goroutine, nothing stored.
//	go run ./scripts/floor streams [-n 40000] [-c 200] [-workers 0]
//	    server-streaming RPCs that take one request and send two
//	    150-byte messages, c in flight over 4 connections: the CPU
//	    every REAPI Execute costs a client and a server at least.
package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"flag"
	"fmt"
	"hash"
	"io"
	"net"
	"os"
	"os/exec"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/zeebo/blake3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

const (
	blobSize = 100 << 20
	chunk    = 1 << 20
	runs     = 9
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: floor tcp|bulk|streams [flags]")
		os.Exit(2)
	}
	cmd, args := os.Args[1], os.Args[2:]
	fs := flag.NewFlagSet(cmd, flag.ExitOnError)
	server := fs.Bool("server", false, "run as the server (started by the client)")
	addr := fs.String("addr", "127.0.0.1:9777", "server address (loopback)")
	hashName := fs.String("hash", "none", "receiver's hash: none, sha256 or blake3")
	pipe := fs.Bool("pipe", false, "tcp: hash in a second goroutine")
	n := fs.Int("n", 40000, "streams: RPCs timed")
	conc := fs.Int("c", 200, "streams: RPCs in flight")
	workers := fs.Int("workers", 0, "streams: server's grpc.NumStreamWorkers")
	fs.Parse(args)
	var err error
	switch {
	case cmd == "tcp" && *server:
		err = tcpServer(*addr, *hashName, *pipe)
	case cmd == "tcp":
		err = withServer(args, func(int) error { return tcpClient(*addr, *hashName, *pipe) })
	case cmd == "bulk" && *server:
		err = grpcServer(*addr, bulkDesc(*hashName))
	case cmd == "bulk":
		err = withServer(args, func(int) error { return bulkClient(*addr, *hashName) })
	case cmd == "streams" && *server:
		err = grpcServer(*addr, streamsDesc, grpc.NumStreamWorkers(uint32(*workers)))
	case cmd == "streams":
		err = withServer(args, func(pid int) error { return streamsClient(*addr, pid, *n, *conc) })
	default:
		err = fmt.Errorf("unknown command %q", cmd)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "floor:", err)
		os.Exit(1)
	}
}

// withServer runs this program as the server with the same arguments,
// waits for its "ready", runs f, and stops the server.
func withServer(args []string, f func(pid int) error) error {
	srv := exec.Command(os.Args[0], append([]string{os.Args[1], "-server"}, args...)...)
	srv.Stderr = os.Stderr
	out, err := srv.StdoutPipe()
	if err != nil {
		return err
	}
	if err := srv.Start(); err != nil {
		return err
	}
	defer func() {
		srv.Process.Signal(syscall.SIGTERM)
		srv.Wait()
	}()
	ready := make([]byte, 6)
	if _, err := io.ReadFull(out, ready); err != nil {
		return fmt.Errorf("server did not start: %v", err)
	}
	return f(srv.Process.Pid)
}

func newHash(name string) (hash.Hash, error) {
	switch name {
	case "none":
		return nil, nil
	case "sha256":
		return sha256.New(), nil
	case "blake3":
		return blake3.New(), nil
	}
	return nil, fmt.Errorf("unknown hash %q", name)
}

// hasher hashes the chunks sent on its channel in a goroutine of its own
// and gives each back on free.
func hasher(h hash.Hash, free chan<- []byte) (chan<- []byte, <-chan struct{}) {
	work, done := make(chan []byte, 4), make(chan struct{})
	go func() {
		defer close(done)
		for b := range work {
			if h != nil {
				h.Write(b)
			}
			if free != nil {
				free <- b[:cap(b)]
			}
		}
		if h != nil {
			h.Sum(nil)
		}
	}()
	return work, done
}

func tcpServer(addr, hashName string, pipe bool) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	fmt.Println("ready")
	free := make(chan []byte, 8)
	for range cap(free) {
		free <- make([]byte, chunk)
	}
	for {
		c, err := ln.Accept()
		if err != nil {
			return err
		}
		h, err := newHash(hashName)
		if err != nil {
			return err
		}
		var work chan<- []byte
		var done <-chan struct{}
		if pipe {
			work, done = hasher(h, free)
		}
		for got := 0; got < blobSize; {
			b := <-free
			k, err := io.ReadFull(c, b)
			got += k
			if pipe {
				work <- b[:k]
			} else {
				if h != nil {
					h.Write(b[:k])
				}
				free <- b
			}
			if err != nil {
				break
			}
		}
		if pipe {
			close(work)
			<-done
		} else if h != nil {
			h.Sum(nil)
		}
		c.Write([]byte{1})
		c.Close()
	}
}

func tcpClient(addr, hashName string, pipe bool) error {
	data := blob()
	var ds []time.Duration
	for range runs {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			return err
		}
		start := time.Now()
		for off := 0; off < blobSize; off += chunk {
			if _, err := c.Write(data[off : off+chunk]); err != nil {
				return err
			}
		}
		if _, err := io.ReadFull(c, make([]byte, 1)); err != nil {
			return err
		}
		ds = append(ds, time.Since(start))
		c.Close()
	}
	report(fmt.Sprintf("tcp upload, hash %s, pipe %v", hashName, pipe), ds)
	return nil
}

func blob() []byte {
	data := make([]byte, blobSize)
	for i := range data {
		data[i] = byte(i * 13)
	}
	return data
}

func report(name string, ds []time.Duration) {
	sort.Slice(ds, func(i, j int) bool { return ds[i] < ds[j] })
	med := ds[len(ds)/2]
	fmt.Printf("%-40s median %v (min %v): %.0f MiB/s\n", name, med.Round(time.Millisecond), ds[0].Round(time.Millisecond), float64(blobSize)/(1<<20)/med.Seconds())
}

// The farm's transport settings (internal/farm), so the floor is theirs.
var (
	serverOpts = []grpc.ServerOption{grpc.MaxRecvMsgSize(8 << 20), grpc.InitialWindowSize(16 << 20),
		grpc.InitialConnWindowSize(16 << 20), grpc.WriteBufferSize(1 << 20), grpc.ReadBufferSize(1 << 20)}
	dialOpts = []grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithInitialWindowSize(16 << 20), grpc.WithInitialConnWindowSize(16 << 20),
		grpc.WithWriteBufferSize(1 << 20), grpc.WithReadBufferSize(1 << 20),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(8 << 20))}
)

func grpcServer(addr string, desc *grpc.ServiceDesc, opts ...grpc.ServerOption) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	s := grpc.NewServer(append(serverOpts, opts...)...)
	s.RegisterService(desc, nil)
	fmt.Println("ready")
	return s.Serve(ln)
}

func bulkDesc(hashName string) *grpc.ServiceDesc {
	data := blob()
	return &grpc.ServiceDesc{
		ServiceName: "floor.Bulk",
		HandlerType: (*any)(nil),
		Streams: []grpc.StreamDesc{{
			StreamName:    "Write",
			ClientStreams: true,
			Handler: func(_ any, s grpc.ServerStream) error {
				h, err := newHash(hashName)
				if err != nil {
					return err
				}
				work, done := hasher(h, nil)
				for {
					var m wrapperspb.BytesValue
					if err := s.RecvMsg(&m); err == io.EOF {
						break
					} else if err != nil {
						close(work)
						return err
					}
					work <- m.Value
				}
				close(work)
				<-done
				return s.SendMsg(&wrapperspb.BytesValue{})
			},
		}, {
			StreamName:    "Read",
			ServerStreams: true,
			Handler: func(_ any, s grpc.ServerStream) error {
				var m wrapperspb.BytesValue
				if err := s.RecvMsg(&m); err != nil {
					return err
				}
				for off := 0; off < blobSize; off += chunk {
					if err := s.SendMsg(&wrapperspb.BytesValue{Value: data[off : off+chunk]}); err != nil {
						return err
					}
				}
				return nil
			},
		}},
	}
}

func bulkClient(addr, hashName string) error {
	c, err := grpc.NewClient(addr, dialOpts...)
	if err != nil {
		return err
	}
	defer c.Close()
	desc := bulkDesc(hashName)
	data := blob()
	ctx := context.Background()
	var rs, ws []time.Duration
	for range runs {
		start := time.Now()
		s, err := c.NewStream(ctx, &desc.Streams[1], "/floor.Bulk/Read")
		if err != nil {
			return err
		}
		if err := s.SendMsg(&wrapperspb.BytesValue{}); err != nil {
			return err
		}
		s.CloseSend()
		got := 0
		for {
			var m wrapperspb.BytesValue
			if err := s.RecvMsg(&m); err == io.EOF {
				break
			} else if err != nil {
				return err
			}
			got += len(m.Value)
		}
		if got != blobSize {
			return fmt.Errorf("read %d bytes, want %d", got, blobSize)
		}
		rs = append(rs, time.Since(start))
	}
	for range runs {
		start := time.Now()
		s, err := c.NewStream(ctx, &desc.Streams[0], "/floor.Bulk/Write")
		if err != nil {
			return err
		}
		for off := 0; off < blobSize; off += chunk {
			if err := s.SendMsg(&wrapperspb.BytesValue{Value: data[off : off+chunk]}); err != nil {
				return err
			}
		}
		s.CloseSend()
		if err := s.RecvMsg(&wrapperspb.BytesValue{}); err != nil {
			return err
		}
		ws = append(ws, time.Since(start))
	}
	report("grpc download", rs)
	report("grpc upload, hash "+hashName, ws)
	return nil
}

var streamsDesc = &grpc.ServiceDesc{
	ServiceName: "floor.Streams",
	HandlerType: (*any)(nil),
	Streams: []grpc.StreamDesc{{
		StreamName:    "Exec",
		ServerStreams: true,
		Handler: func(_ any, s grpc.ServerStream) error {
			var req wrapperspb.BytesValue
			if err := s.RecvMsg(&req); err != nil {
				return err
			}
			resp := &wrapperspb.BytesValue{Value: make([]byte, 150)}
			if err := s.SendMsg(resp); err != nil {
				return err
			}
			return s.SendMsg(resp)
		},
	}},
}

func cpuTime() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// procCPU is the CPU time process pid has used, from /proc (in clock
// ticks of 10 ms).
func procCPU(pid int) time.Duration {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	// Fields after the command name, which is in parentheses.
	i := bytes.LastIndexByte(b, ')')
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 13 {
		return 0
	}
	ut, _ := strconv.Atoi(f[11])
	st, _ := strconv.Atoi(f[12])
	return time.Duration(ut+st) * 10 * time.Millisecond
}

func streamsClient(addr string, pid, n, conc int) error {
	var conns []*grpc.ClientConn
	for range 4 {
		c, err := grpc.NewClient(addr, dialOpts...)
		if err != nil {
			return err
		}
		defer c.Close()
		conns = append(conns, c)
	}
	call := func(i int) error {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		s, err := conns[i%len(conns)].NewStream(ctx, &streamsDesc.Streams[0], "/floor.Streams/Exec")
		if err != nil {
			return err
		}
		if err := s.SendMsg(&wrapperspb.BytesValue{Value: make([]byte, 80)}); err != nil {
			return err
		}
		s.CloseSend()
		for {
			var m wrapperspb.BytesValue
			if err := s.RecvMsg(&m); err == io.EOF {
				return nil
			} else if err != nil {
				return err
			}
		}
	}
	run := func(total int) error {
		var next atomic.Int64
		var wg sync.WaitGroup
		errs := make(chan error, conc)
		for range conc {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := int(next.Add(1)); i <= total; i = int(next.Add(1)) {
					if err := call(i); err != nil {
						errs <- err
						return
					}
				}
			}()
		}
		wg.Wait()
		close(errs)
		return <-errs
	}
	if err := run(2000); err != nil { // warm-up
		return err
	}
	c0, s0 := cpuTime(), procCPU(pid)
	start := time.Now()
	if err := run(n); err != nil {
		return err
	}
	el, cc, sc := time.Since(start), cpuTime()-c0, procCPU(pid)-s0
	fmt.Printf("%d streams, %d in flight: %.0f/s; CPU per stream: client %.0f µs, server %.0f µs\n",
		n, conc, float64(n)/el.Seconds(), float64(cc.Microseconds())/float64(n), float64(sc.Microseconds())/float64(n))
	return nil
}
