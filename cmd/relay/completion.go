package main

import (
	"fmt"
	"os"
	"strings"

	"github.com/urfave/cli/v2"
)

// relay completion: a shell's completion script for relay. bash's and
// zsh's are relay's own and ask relay itself what may come next (cli's
// EnableBashCompletion: a command line ending in --generate-bash-completion
// prints the commands or the flags that match); fish's is cli's, written
// out from the command definitions.

const completionDescription = `Prints the completion script of SHELL (bash, zsh or fish) for relay's commands and flags.
The Debian package installs all three; by hand:

   bash:  source <(relay completion bash)      # in ~/.bashrc, or:
          relay completion bash > /etc/bash_completion.d/relay
   zsh:   relay completion zsh > "${fpath[1]}/_relay"   # a directory in $fpath
   fish:  relay completion fish > ~/.config/fish/completions/relay.fish

bash's and zsh's scripts run relay to complete (relay ARGS --generate-bash-completion),
so they follow the relay on PATH; after "--" they complete file names only, the server's
command line being no business of relay's.`

// completionShells are the shells relay completion knows, in the order its
// usage error names them.
var completionShells = []string{"bash", "zsh", "fish"}

func completionCommand() *cli.Command {
	return &cli.Command{
		Name:         "completion",
		Usage:        "print a shell completion script: bash, zsh or fish",
		UsageText:    "relay completion bash|zsh|fish",
		Description:  completionDescription,
		Action:       completionAction,
		OnUsageError: onUsageError,
		BashComplete: func(c *cli.Context) {
			if !completingFlag() && !c.Args().Present() {
				fmt.Fprintln(c.App.Writer, strings.Join(completionShells, "\n"))
				return
			}
			completeFlags(c)
		},
	}
}

// withCompletion gives each command that completes nothing of its own
// completeFlags, in place of cli's default, which offers the help
// subcommand cli adds to each command: relay's commands take paths and
// a command line as arguments, which the shell completes better.
func withCompletion(cmds ...*cli.Command) []*cli.Command {
	for _, c := range cmds {
		if c.BashComplete == nil {
			c.BashComplete = completeFlags
		}
	}
	return cmds
}

// completeFlags prints the command's flags that match the word being
// completed, when it starts with "-"; else nothing.
func completeFlags(c *cli.Context) {
	if completingFlag() {
		cli.DefaultCompleteWithFlags(c.Command)(c)
	}
}

// completingFlag tells whether the word being completed is a flag: the
// scripts pass it before --generate-bash-completion only then. cli reads
// it from os.Args too.
func completingFlag() bool {
	n := len(os.Args)
	return n > 2 && strings.HasPrefix(os.Args[n-2], "-")
}

func completionAction(c *cli.Context) error {
	if c.Args().Len() != 1 {
		return usagef("relay completion takes one shell: bash, zsh or fish")
	}
	var script string
	switch shell := c.Args().First(); shell {
	case "bash":
		script = bashCompletion
	case "zsh":
		script = zshCompletion
	case "fish":
		var err error
		if script, err = c.App.ToFishCompletion(); err != nil {
			return fmt.Errorf("fish completion: %w", err)
		}
		// cli leaves in the descriptions the backquotes that mark a
		// flag's value in its usage (`ADDR`), which --help takes out.
		script = strings.ReplaceAll(script, "`", "")
	default:
		return usagef("relay completion: unknown shell %q; use bash, zsh or fish", shell)
	}
	_, err := fmt.Fprint(c.App.Writer, script)
	return err
}

// bashCompletion is relay's bash completion. It hands relay the words
// before the cursor (and the word under it when that is a flag) and
// offers what relay prints that matches; with nothing to offer, bash
// completes file names (-o default).
const bashCompletion = `# bash completion for relay                                -*- shell-script -*-
# Written by "relay completion bash"; it asks relay itself, so it follows
# the relay on PATH.

_relay() {
    local cur=${COMP_WORDS[COMP_CWORD]}
    local relay=${COMP_WORDS[0]}
    local -a args=("${COMP_WORDS[@]:1:COMP_CWORD-1}")
    local w
    # After "--" comes the server's command line: file names only.
    for w in "${args[@]}"; do
        [[ $w == -- ]] && return 0
    done
    [[ $relay == "~/"* ]] && relay=$HOME/${relay#"~/"}
    # A flag being completed goes along; "--" never does, since relay
    # would then run the command instead of completing it: "-" asks
    # for the same flags.
    if [[ $cur == -- ]]; then
        args+=(-)
    elif [[ $cur == -* ]]; then
        args+=("$cur")
    fi
    local -a words
    mapfile -t words < <(command "$relay" "${args[@]}" --generate-bash-completion 2>/dev/null)
    local IFS=$'\n'
    COMPREPLY=($(compgen -W "${words[*]}" -- "$cur"))
}
complete -o default -F _relay relay
`

// zshCompletion is relay's zsh completion, for a directory in $fpath as
// _relay (autoloaded: the last lines call _relay) or sourced (they
// register it with compdef).
const zshCompletion = `#compdef relay
# zsh completion for relay, written by "relay completion zsh"; it asks
# relay itself, so it follows the relay on PATH.

_relay() {
    local cur=${words[CURRENT]}
    local -a args opts
    args=("${(@)words[2,CURRENT-1]}")
    # After "--" comes the server's command line: file names only.
    if (( ${args[(Ie)--]} )); then
        _files
        return
    fi
    # A flag being completed goes along; "--" never does, since relay
    # would then run the command instead of completing it: "-" asks
    # for the same flags.
    if [[ $cur == -- ]]; then
        args+=(-)
    elif [[ $cur == -* ]]; then
        args+=("$cur")
    fi
    # $0 ending in zsh makes relay print "command:what it does".
    opts=("${(@f)$(env 0=zsh ${~words[1]} "${args[@]}" --generate-bash-completion 2>/dev/null)}")
    if [[ -n ${opts[1]} ]]; then
        _describe -t relay 'relay' opts
    else
        _files
    fi
}

if [[ ${funcstack[1]} == _relay ]]; then
    _relay "$@"
else
    compdef _relay relay
fi
`
