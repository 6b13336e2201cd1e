// Command goload is scripts/bench's Go client: it drives a SPIFFE Workload API socket through the
// go-spiffe v2 SDK, as SPIRE's agent was measured (issue 12), so that the client spends little of the
// machine's two cores. The agent and the floor server are driven by the same code.
//
// Usage (every mode prints one JSON object, `streams` one more when stdin closes):
//
//	goload load -socket S [-concurrency C] [-seconds D] [-per-call] [-jwt-audience A]
//	goload once -socket S
//	goload streams -socket S -count N
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"math"
	"os"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
)

const deadline = 30 * time.Second // every wait is bounded by this

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: goload load|once|streams -socket S ...")
		os.Exit(2)
	}
	flags := flag.NewFlagSet(os.Args[1], flag.ExitOnError)
	socket := flags.String("socket", "", "the Workload API's unix socket")
	concurrency := flags.Int("concurrency", 1, "callers calling at once, a connection each")
	seconds := flags.Float64("seconds", 3, "how long the callers call")
	perCall := flags.Bool("per-call", false, "a new connection for every call (go-spiffe's convenience functions)")
	audience := flags.String("jwt-audience", "", "FetchJWTSVID for this audience instead of FetchX509SVID")
	count := flags.Int("count", 1000, "streams to open")
	_ = flags.Parse(os.Args[2:])
	address := workloadapi.WithAddr("unix://" + *socket)

	var result any
	var err error
	switch os.Args[1] {
	case "load":
		result, err = load(address, *concurrency, time.Duration(*seconds*float64(time.Second)), *perCall, *audience)
	case "once":
		result, err = once(address)
	case "streams":
		err = streams(address, *count)
	default:
		err = fmt.Errorf("unknown mode %q", os.Args[1])
	}
	if err != nil {
		say(map[string]any{"error": err.Error()})
		os.Exit(1)
	}
	if result != nil {
		say(result)
	}
}

func say(value any) {
	_ = json.NewEncoder(os.Stdout).Encode(value)
}

// call is one FetchX509SVID (or FetchJWTSVID) on a client; it returns the SPIFFE ID answered.
type call func(ctx context.Context, client *workloadapi.Client) (string, error)

func x509Call(ctx context.Context, client *workloadapi.Client) (string, error) {
	svid, err := client.FetchX509SVID(ctx)
	if err != nil {
		return "", err
	}
	return svid.ID.String(), nil
}

func jwtCall(audience string) call {
	return func(ctx context.Context, client *workloadapi.Client) (string, error) {
		svid, err := client.FetchJWTSVID(ctx, jwtsvid.Params{Audience: audience})
		if err != nil {
			return "", err
		}
		return svid.ID.String(), nil
	}
}

func load(address workloadapi.ClientOption, concurrency int, duration time.Duration, perCall bool,
	audience string) (map[string]any, error) {
	do := call(x509Call)
	if audience != "" {
		do = jwtCall(audience)
	}
	ctx, cancel := context.WithTimeout(context.Background(), deadline+duration)
	defer cancel()

	var warmed sync.WaitGroup
	warmed.Add(concurrency)
	start := make(chan struct{})
	var stop atomic.Bool
	var failures atomic.Int64
	var firstError atomic.Value
	latencies := make([][]float64, concurrency)
	var done sync.WaitGroup
	for i := 0; i < concurrency; i++ {
		done.Add(1)
		go func(i int) {
			defer done.Done()
			client, err := workloadapi.New(ctx, address)
			if err == nil {
				_, err = do(ctx, client) // a warm-up: the connection's attestation, the SVID's issuance
			}
			warmed.Done()
			if err != nil {
				failures.Add(1)
				firstError.CompareAndSwap(nil, err.Error())
				return
			}
			<-start
			for !stop.Load() {
				if perCall {
					client.Close()
					if client, err = workloadapi.New(ctx, address); err != nil {
						failures.Add(1)
						firstError.CompareAndSwap(nil, err.Error())
						return
					}
				}
				began := time.Now()
				if _, err := do(ctx, client); err != nil {
					failures.Add(1)
					firstError.CompareAndSwap(nil, err.Error())
					continue
				}
				latencies[i] = append(latencies[i], float64(time.Since(began).Microseconds())/1000)
			}
			client.Close()
		}(i)
	}
	warmed.Wait()
	began := time.Now()
	close(start)
	time.Sleep(duration)
	stop.Store(true)
	elapsed := time.Since(began).Seconds()
	done.Wait()

	all := []float64{}
	for _, own := range latencies {
		all = append(all, own...)
	}
	connection := "per caller"
	if perCall {
		connection = "per call"
	}
	result := map[string]any{"concurrency": concurrency, "connection": connection, "calls": len(all),
		"seconds": round(elapsed), "per_s": math.Round(float64(len(all))/elapsed*10) / 10,
		"errors": failures.Load(), "first_error": firstError.Load()}
	for key, value := range spread(all) {
		result[key] = value
	}
	return result, nil
}

// spread is p50, p99 (nearest rank) and max, in ms; nil without values.
func spread(values []float64) map[string]any {
	if len(values) == 0 {
		return map[string]any{"p50_ms": nil, "p99_ms": nil, "max_ms": nil}
	}
	sort.Float64s(values)
	median := values[len(values)/2]
	if len(values)%2 == 0 {
		median = (values[len(values)/2-1] + values[len(values)/2]) / 2
	}
	return map[string]any{"p50_ms": round(median), "p99_ms": round(values[int(math.Ceil(float64(len(values))*0.99))-1]),
		"max_ms": round(values[len(values)-1])}
}

func round(value float64) float64 {
	return math.Round(value*1000) / 1000
}

// once is a new workload's first fetch: from connecting to its X.509-SVID, as this process's first call.
func once(address workloadapi.ClientOption) (map[string]any, error) {
	ctx, cancel := context.WithTimeout(context.Background(), deadline)
	defer cancel()
	began := time.Now()
	svid, err := workloadapi.FetchX509SVID(ctx, address)
	if err != nil {
		return nil, err
	}
	return map[string]any{"ms": float64(time.Since(began).Microseconds()) / 1000,
		"spiffe_ids": []string{svid.ID.String()}}, nil
}

// firstUpdate tells once, when its watch has its first X.509 context, and keeps a watch error.
type firstUpdate struct {
	once    sync.Once
	arrived chan struct{}
	err     atomic.Value
}

func (w *firstUpdate) OnX509ContextUpdate(*workloadapi.X509Context) {
	w.once.Do(func() { close(w.arrived) })
}

func (w *firstUpdate) OnX509ContextWatchError(err error) {
	// A stream the agent ends or refuses counts as failed, even if the SDK's retry would succeed later.
	w.err.CompareAndSwap(nil, err.Error())
	w.once.Do(func() { close(w.arrived) })
}

// streams opens `count` FetchX509SVID streams at once, a connection each, says when every one has its first
// message, and holds them until stdin closes.
func streams(address workloadapi.ClientOption, count int) error {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	watchers := make([]*firstUpdate, count)
	var ended sync.WaitGroup
	began := time.Now()
	for i := range watchers {
		watcher := &firstUpdate{arrived: make(chan struct{})}
		watchers[i] = watcher
		ended.Add(1)
		go func() {
			defer ended.Done()
			client, err := workloadapi.New(ctx, address)
			if err != nil {
				watcher.OnX509ContextWatchError(err)
				watcher.once.Do(func() { close(watcher.arrived) })
				return
			}
			defer client.Close()
			_ = client.WatchX509Context(ctx, watcher)
		}()
	}
	timeout := time.After(2 * deadline)
	failed := 0
	var firstEnd any
	for _, watcher := range watchers {
		select {
		case <-watcher.arrived:
		case <-timeout:
			return fmt.Errorf("not every stream had its first message within %s", 2*deadline)
		}
		if message := watcher.err.Load(); message != nil {
			failed++
			if firstEnd == nil {
				firstEnd = message
			}
		}
	}
	say(map[string]any{"opened_s": round(time.Since(began).Seconds()), "streams": count, "ended": failed,
		"first_end": firstEnd})
	_, _ = io.Copy(io.Discard, bufio.NewReader(os.Stdin)) // until the bench closes stdin
	cancel()
	ended.Wait()
	return nil
}
